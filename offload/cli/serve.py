"""`offload serve MODEL`: an OpenAI-compatible server (POST /v1/chat/completions, /v1/completions; GET /v1/models,
/health) over the model, on FastAPI + uvicorn (pip install -e ".[serve]"). Binds 127.0.0.1 unless --host says
otherwise; --api-key makes every route but /health ask for `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import logging
import signal
import socket
import sys

from .common import (CommandError, UsageError, add_model_options, check_options, note, open_model, parser, plan_report,
                     run_command)

PROG = "offload serve"


def parse_args(argv):
    p = parser(PROG, __doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface, with --api-key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` (also $OFFLOAD_API_KEY)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model's name in the API (default: MODEL)")
    p.add_argument("--max-batch-size", type=int, default=4, metavar="N", help="requests generated at once, "
                   "in one batch (default 4; the plan reserves KV cache for N rows of --max-seq-len)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests that may wait (default 64; "
                   "more get 503)")
    p.add_argument("--speculate", choices=["adaptive", "always"], default="adaptive", help="with --draft: verify "
                   "the draft's proposals when this server's measured times say it pays (default), or always")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1-65535, got {args.port}")
    if args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {args.max_queue}")
    check_options(args)
    return args


def _run(argv) -> int:
    import os
    args = parse_args(argv)
    try:
        import uvicorn
        from offload.serve.app import build_app
    except ImportError:
        raise CommandError("the server needs FastAPI and uvicorn: pip install -e \".[serve]\"") from None
    from offload.serve.worker import Worker
    api_key = args.api_key or os.environ.get("OFFLOAD_API_KEY") or None
    check_address(args.host, args.port)                   # before a model is loaded for nothing
    tokenizer, template, model = open_model(args, max_batch_size=args.max_batch_size)
    worker = None
    try:
        if args.show_plan:
            print(plan_report(model), file=sys.stderr, flush=True)
        try:
            worker = Worker(model, tokenizer, max_queue=args.max_queue, speculate=args.speculate)
        except ValueError as error:
            raise CommandError(str(error)) from None
        name = args.served_model_name or args.model
        app = build_app(worker, model_name=name, template=template, max_seq_len=model.max_seq_len, api_key=api_key)
        note(f"serving {name} on http://{args.host}:{args.port}/v1 ({model.max_batch_size} requests at once, "
             f"context {model.max_seq_len} tokens"
             f"{', API key required' if api_key else ''}); Ctrl-C stops")
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        server = _server_class(uvicorn)(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                                       access_log=False))
        try:
            server.run()
        except SystemExit:                                # uvicorn's startup failed (it logged why)
            raise CommandError(f"cannot serve on {args.host}:{args.port} (see above)") from None
    finally:
        if worker is not None:
            worker.stop()
        model.close()
    return 0


def check_address(host: str, port: int) -> None:
    """CommandError when (host, port) cannot be listened on: taken, or not an address of this machine."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise CommandError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        """uvicorn's server, stopping on SIGTERM / Ctrl-C as it does, then returning (uvicorn would raise the
        signal again after its shutdown, killing the process before the model is closed)."""

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True                  # a second Ctrl-C: stop waiting for open requests
            self.should_exit = True
    return Server


def main(argv=None) -> int:
    return run_command(PROG, _run, sys.argv[1:] if argv is None else argv)
