"""``protosam serve``: the ProtoSAM server for remote Slicer workstations (see
:mod:`protosam.serving.server` for the API, :mod:`protosam.serving.scheduler` for scheduling)."""
import argparse
import ipaddress
import logging
import sys
from typing import Any, Dict, Optional, Sequence

from .. import __version__
from ..errors import InputError
from ..serving.scheduler import JobScheduler, ServerConfig
from ..serving.server import DEFAULT_PORT, ConnectionLimits, create_app, guarded_protocol_class
from ..serving.tokens import TOKEN_FILE_NAME, load_tokens

__all__ = ["build_parser", "server_tokens", "serve", "cli_serve", "main", "is_loopback"]

_DESCRIPTION = "The ProtoSAM server: runs the worker protocol over HTTP for many users."


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    from .common import add_model_options

    parser = parser or argparse.ArgumentParser(prog="protosam serve", description=_DESCRIPTION)
    net = parser.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only); "
                     "another address needs --ssl-certfile/--ssl-keyfile or --insecure")
    net.add_argument("--port", type=int, default=DEFAULT_PORT)
    tokens = net.add_mutually_exclusive_group()
    tokens.add_argument("--token", default=None, help="the one user's token (visible in the process list: prefer "
                        "--tokens); default: a token generated at the first start and stored in "
                        f"$PROTOSAM_HOME/{TOKEN_FILE_NAME}")
    tokens.add_argument("--tokens", default=None, metavar="FILE", help="one 'name:token' line per user")
    net.add_argument("--ssl-certfile", default=None, metavar="PEM", help="TLS certificate (serve HTTPS)")
    net.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="TLS private key")
    net.add_argument("--insecure", action="store_true",
                     help="allow plain HTTP on a non-loopback address (tokens and images travel unencrypted)")
    net.add_argument("--max-request-mb", type=float, default=1024.0, help="largest request body (413 beyond)")
    net.add_argument("--cache-mb-per-user", type=float, default=1024.0,
                     help="encoder outputs, plus the volumes and masks of correction sessions, each user may hold on "
                     "the server (the default holds a 64-slice ViT-B volume at 672 px)")
    net.add_argument("--max-jobs-per-user", type=int, default=4, help="queued, running and unfetched jobs per user")
    net.add_argument("--max-sessions-per-user", type=int, default=4,
                     help="open click-correction sessions per user (each holds a volume; 429 beyond)")
    net.add_argument("--session-idle-minutes", type=float, default=30.0,
                     help="a correction session unused this long is closed and its memory freed")
    net.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default torch's); the same count as a local run gives the same bits")
    net.add_argument("--access-log", action="store_true", help="log every request line (paths hold job ids)")
    limits = parser.add_argument_group("connection limits (see docs/security.md)")
    limits.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                        help="close a connection that has not sent a complete request head within S seconds")
    limits.add_argument("--min-body-rate-kb", type=float, default=64.0, metavar="KB",
                        help="cut a request body slower than KB kB/s on average after --body-grace seconds")
    limits.add_argument("--body-grace", type=float, default=10.0, metavar="S", help="see --min-body-rate-kb")
    limits.add_argument("--max-connections-per-address", type=int, default=32, metavar="N",
                        help="open connections per client address (behind a proxy: per proxy address)")
    limits.add_argument("--max-active-requests", type=int, default=128, metavar="N",
                        help="authenticated requests answered at once (503 beyond); idle connections do not count")
    add_model_options(parser, propagation=False)  # each request says how it walks volumes
    return parser


def _served_models(args) -> Dict[str, Any]:
    return {"dinov2": args.dinov2, "dinov2_checkpoint": args.dinov2_checkpoint, "sam": args.sam,
            "sam_checkpoint": args.sam_checkpoint, "input_size": args.input_size}


def server_tokens(args: argparse.Namespace) -> Dict[str, str]:
    """The users of ``args`` (see :func:`load_tokens`). The generated token lives in
    ``$PROTOSAM_HOME/server_token`` (``~/.protosam`` by default) whatever ``--weights-home`` says:
    that option moves the weights, not the server's secret."""
    return load_tokens(args.token, args.tokens, None, announce=lambda text: print(text, flush=True))


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.preset != "default" or args.cca is not None or args.batch_size is not None:
        raise InputError("protosam serve takes no --preset, --cca or --batch-size: each request brings its preset, "
                         "and the engine batches slices as it does locally. --precision sets what a request's "
                         "precision 'auto' means here.")
    if not is_loopback(args.host):
        if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
            raise InputError("TLS needs both --ssl-certfile and --ssl-keyfile.")
        if not args.ssl_certfile and not args.insecure:
            raise InputError(
                f"Refusing to serve plain HTTP on {args.host}: tokens and images would cross the network unencrypted. "
                "Give --ssl-certfile and --ssl-keyfile, or keep --host 127.0.0.1 behind a TLS reverse proxy, or add "
                "--insecure on a network you trust.")
        if not args.ssl_certfile:
            print(f"WARNING: serving plain HTTP on {args.host} (--insecure): tokens and images travel unencrypted.",
                  file=sys.stderr)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from ..engine import resolve_device
    from ..precision import resolve_precision

    device = resolve_device(args.device)
    # Checked before the token and the port: a precision this device cannot run fails now, not per request.
    precision, reason = resolve_precision(args.precision, device)
    tokens = server_tokens(args)
    config = ServerConfig(models=_served_models(args), tokens=tokens, device=str(device), precision=args.precision,
                          weights_home=args.weights_home, download=not args.no_download,
                          max_request_bytes=int(args.max_request_mb * 1024 * 1024),
                          cache_bytes_per_user=int(args.cache_mb_per_user * 1024 * 1024),
                          max_jobs_per_user=args.max_jobs_per_user,
                          max_sessions_per_user=args.max_sessions_per_user,
                          session_idle_s=args.session_idle_minutes * 60.0)
    scheduler = JobScheduler(config)
    scheduler.start()
    app = create_app(scheduler, max_active_requests=args.max_active_requests)
    limits = ConnectionLimits(header_timeout=args.header_timeout, min_body_rate=args.min_body_rate_kb * 1024,
                              body_grace=args.body_grace, per_address=args.max_connections_per_address)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"ProtoSAM server {__version__}: {scheme}://{args.host}:{args.port} on {config.device}, "
          f"{len(set(tokens.values()))} user(s), models {args.dinov2} + {args.sam}, precision {args.precision} -> "
          f"{precision} ({reason}; a request may ask for another)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                    ssl_keyfile=args.ssl_keyfile, access_log=args.access_log, log_level="info",
                    # h11 parses; the guarded protocol times out heads and slow bodies and caps
                    # connections per address; uvicorn's limit_concurrency is off (it counted idle
                    # connections): create_app's guard bounds authenticated requests instead.
                    http=guarded_protocol_class(limits), limit_concurrency=None, timeout_keep_alive=5,
                    timeout_graceful_shutdown=5)
    finally:
        scheduler.stop()
    return 0


def cli_serve(args: argparse.Namespace) -> int:
    """``protosam serve`` (the CLI configured warnings only; the server logs its jobs)."""
    logging.getLogger("protosam").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli_serve(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
