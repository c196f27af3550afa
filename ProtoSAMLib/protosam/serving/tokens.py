"""Who may use the ProtoSAM server: tokens from ``--token``, a tokens file, or the one generated
at the first start, and the constant-time check of a request's bearer token."""
import hmac
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Dict, Optional

from ..errors import InputError

__all__ = ["TOKEN_FILE_NAME", "MIN_TOKEN_LENGTH", "parse_tokens_file", "load_tokens", "TokenTable"]

TOKEN_FILE_NAME = "server_token"
_USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_TOKEN_LENGTH = 16


def _token_file_path(home: Optional[str] = None) -> Path:
    from ..weights import home_dir

    return home_dir(home) / TOKEN_FILE_NAME


def _read_private(path: os.PathLike, follow_links: bool) -> str:
    """The text of a file that holds tokens, refused unless only its owner (this user) can
    read or write it; ``follow_links`` False also refuses a symbolic link. The checks use the
    opened file (``fstat``), so the file cannot be swapped between check and read."""
    flags = os.O_RDONLY | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    try:
        descriptor = os.open(str(path), flags)
    except OSError as error:
        if not follow_links and os.path.islink(str(path)):
            raise InputError(f"{path} is a symbolic link; a token file must be a plain file (delete the link to "
                             "generate a new token).") from None
        raise InputError(f"Cannot read the token file {path}: {error}") from None
    with os.fdopen(descriptor, "r", encoding="utf-8") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path} is not a regular file; a token file must be one.")
        if os.name == "posix":
            if info.st_uid != os.getuid():
                raise InputError(f"{path} belongs to another user (uid {info.st_uid}); the server's token file must "
                                 "be owned by the user who runs the server.")
            if stat.S_IMODE(info.st_mode) & 0o077:
                raise InputError(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: other users can read or change "
                                 f"its tokens. Make it private with: chmod 600 {path}")
        try:
            return stream.read()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"Cannot read the token file {path}: {error}") from None


def parse_tokens_file(path: os.PathLike) -> Dict[str, str]:
    """``name:token`` per line -> {token: name}. A ``#`` starts a comment anywhere on a line
    (tokens never contain one); blank lines are ignored; tokens hold no spaces. The file must
    be private (mode 0600 or stricter, owned by the server's user)."""
    tokens: Dict[str, str] = {}
    names = set()
    text = _read_private(path, follow_links=True)
    for number, line in enumerate(text.splitlines(), 1):
        line = line.partition("#")[0].strip()
        if not line:
            continue
        name, separator, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not separator or not _USER_NAME.match(name):
            raise InputError(f"{path}, line {number}: expected 'name:token' with a name of letters, digits, "
                             "'_', '.', '@' or '-'")
        if any(character.isspace() for character in token):
            raise InputError(f"{path}, line {number}: the token of '{name}' contains a space; write one "
                             "'name:token' per line ('#' starts a comment)")
        if len(token) < MIN_TOKEN_LENGTH:
            raise InputError(f"{path}, line {number}: the token of '{name}' is shorter than {MIN_TOKEN_LENGTH} "
                             "characters; generate one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
        if name in names or token in tokens:
            raise InputError(f"{path}, line {number}: user '{name}' or its token appears twice")
        names.add(name)
        tokens[token] = name
    if not tokens:
        raise InputError(f"The tokens file {path} names no user; add lines 'name:token'.")
    return tokens


def load_tokens(token: Optional[str], tokens_file: Optional[str], home: Optional[str] = None,
                announce=print) -> Dict[str, str]:
    """The server's users, {token: name}.

    ``--token``: one user "user". ``--tokens FILE``: see :func:`parse_tokens_file`. Neither:
    the token stored in ``<home>/server_token`` (``home``: ``$PROTOSAM_HOME`` or ``~/.protosam``
    when None), mode 0600, generated on the first start and reused on the next (refused if it
    is a link, another user's, or readable by others). The token itself is never printed
    (system journals keep a service's output): ``announce`` gets the file's path.
    """
    if token is not None and tokens_file is not None:
        raise InputError("Give either --token or --tokens, not both.")
    if token is not None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise InputError(f"--token must be at least {MIN_TOKEN_LENGTH} characters long.")
        return {token: "user"}
    if tokens_file is not None:
        return parse_tokens_file(tokens_file)
    path = _token_file_path(home)
    if path.is_file() or path.is_symlink():
        stored = _read_private(path, follow_links=False).strip()
        if len(stored) < MIN_TOKEN_LENGTH or any(character.isspace() for character in stored):
            raise InputError(f"The stored token in {path} is too short; delete the file to generate a new one.")
        announce(f"ProtoSAM server: using the token stored in {path}")
        return {stored: "user"}
    path.parent.mkdir(parents=True, exist_ok=True)
    generated = secrets.token_urlsafe(32)
    descriptor = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write(generated + "\n")
    announce(f"ProtoSAM server: generated an access token and stored it in {path} (readable by you only; it is "
             f"not printed). Show it with: cat {path}\nEnter it with the server URL in Slicer (ProtoSAM > Compute on "
             "> ProtoSAM server).")
    return {generated: "user"}


class TokenTable:
    """Constant-time token checks (``hmac.compare_digest`` against every known token)."""

    def __init__(self, tokens: Dict[str, str]):
        self._tokens = [(token.encode("utf-8"), name) for token, name in tokens.items()]

    def user_for(self, authorization: Optional[bytes]) -> Optional[str]:
        if not authorization or not authorization[:7].lower() == b"bearer ":
            return None
        offered = authorization[7:].strip()
        user = None
        for token, name in self._tokens:  # no early exit: timing does not tell which token matched
            if hmac.compare_digest(offered, token):
                user = name
        return user
