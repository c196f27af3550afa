"""Who may use the ProtoSAM server: tokens from ``--token``, a tokens file, or the one generated
at the first start, and the constant-time check of a request's bearer token."""
import hmac
import os
import re
import secrets
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


def parse_tokens_file(path: os.PathLike) -> Dict[str, str]:
    """``name:token`` per line (``#`` comments and blank lines ignored) -> {token: name}."""
    tokens: Dict[str, str] = {}
    names = set()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"Cannot read the tokens file {path}: {error}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not separator or not _USER_NAME.match(name):
            raise InputError(f"{path}, line {number}: expected 'name:token' with a name of letters, digits, "
                             "'_', '.', '@' or '-'")
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
    the token stored in ``$PROTOSAM_HOME/server_token`` (mode 0600), generated and printed
    (with ``announce``, never logged) on the first start, reused on the next.
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
    if path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if len(stored) < MIN_TOKEN_LENGTH:
            raise InputError(f"The stored token in {path} is too short; delete the file to generate a new one.")
        announce(f"ProtoSAM server: using the token stored in {path}")
        return {stored: "user"}
    path.parent.mkdir(parents=True, exist_ok=True)
    generated = secrets.token_urlsafe(32)
    descriptor = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write(generated + "\n")
    announce(f"ProtoSAM server: generated an access token, stored in {path} (readable by you only):\n"
             f"    {generated}\nEnter it with the server URL in Slicer (ProtoSAM > Compute on > ProtoSAM server).")
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
