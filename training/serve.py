"""python -m training.serve: a saved reward model over HTTP, for the RL stage (OpenRLHF, TRL, any client).

    python -m training.serve --model_name_or_path output/rm [--host 127.0.0.1] [--port 8000] [--dtype bf16]
    rewardspeed-serve --model_name_or_path output/rm --max_batch_tokens 16384 --max_wait_ms 10

Endpoints (JSON in, JSON out; every error is JSON `{"error": message}` naming the field):
    POST /score       {"prompt": text | messages, "responses": [text | messages, ...]}
                      -> {"rewards": [...], "normalized_rewards": [...]} (normalised with the eval mean/std
                      training saved in config.json, when it did); a list of such objects -> a list of answers.
                      Rewards equal `python -m training.evaluate --score` for the same texts.
    POST /get_reward  OpenRLHF's remote reward model (`--remote_rm_url`): {"query": [prompt + response texts],
                      "prompts": [...], "labels": [...]} -> {"rewards": [...], "scores": [...]}. A query is scored
                      as prompt + the rest of the query; a query that does not start with its prompt is scored
                      whole (and logged). Other keys are ignored.
    GET  /health      {"status": "ok", "outstanding": responses queued or being scored}
    GET  /info        model, dtype, device, max_seq_len, layout, normalisation, limits, counts

Status codes: 400 malformed JSON, 413 a body or request too large, 422 a missing or invalid field, 503 the queue
is full (`--max_queue`) or the server is shutting down, 504 not scored within `--request_timeout_s`, 500 the
model failed. Scoring runs in `training/serve_engine.py` (micro-batches, prompts computed once per group).
SIGTERM or SIGINT: stop accepting connections, answer every request already received, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.serve_requests import RequestLimits

logger = logging.getLogger("training.serve")


@dataclass(frozen=True)
class ServeSettings:
    """How the HTTP side answers: limits, the per-request timeout, normalisation, what /info reports."""

    limits: RequestLimits
    request_timeout_s: float
    normalization: tuple[float, float] | None  # (reward_mean, reward_std) from config.json
    normalize_reward: bool  # /get_reward's "rewards" normalised (OpenRLHF's --normalize_reward)
    info: dict[str, Any]


def model_normalization(config) -> tuple[float, float] | None:
    """(reward_mean, reward_std) training saved in config.json, or None."""
    mean, std = getattr(config, "reward_mean", None), getattr(config, "reward_std", None)
    if isinstance(mean, (int, float)) and isinstance(std, (int, float)) and std > 0:
        return float(mean), float(std)
    return None


def build_app(engine, settings: ServeSettings):
    """The FastAPI app; its lifespan starts the engine and, on shutdown, lets it finish what it holds."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from training.data.records import DataError
    from training.serve_engine import EngineStopped, QueueFull
    from training.serve_requests import RequestError, parse_get_reward_request, parse_score_request, read_json

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="rewardspeed", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def normalize(rewards: list[float]) -> list[float]:
        mean, std = settings.normalization
        return [(reward - mean) / std for reward in rewards]

    async def rewards_of(groups) -> list[list[float]]:
        future = engine.submit(groups)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(
                504, f"not scored within --request_timeout_s {settings.request_timeout_s:g}"
            ) from None

    async def answer(request: Request, handle) -> JSONResponse:
        try:
            return JSONResponse(await handle(await read_json(request, settings.limits)))
        except RequestError as error:
            status, message = error.status, str(error)
        except QueueFull as error:
            status, message = 503, f"queue full: {error}"
        except EngineStopped as error:
            status, message = 503, str(error)
        except DataError as error:
            status, message = 422, str(error)
        except Exception as error:  # the model's own failure: this request fails, the server stays up
            logger.exception("request failed")
            status, message = 500, f"scoring failed: {type(error).__name__}: {error}"
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def score(request: Request) -> JSONResponse:
        async def handle(body):
            groups, is_list = parse_score_request(body, settings.limits)
            answers = []
            for rewards in await rewards_of(groups):
                answers.append({"rewards": rewards})
                if settings.normalization is not None:
                    answers[-1]["normalized_rewards"] = normalize(rewards)
            return answers if is_list else answers[0]

        return await answer(request, handle)

    async def get_reward(request: Request) -> JSONResponse:
        async def handle(body):
            groups, where, whole = parse_get_reward_request(body, settings.limits)
            if whole:
                logger.warning(
                    "get_reward: %d of %d queries do not start with their prompt and were scored whole "
                    "(first: query %d)",
                    len(whole),
                    len(where),
                    whole[0],
                )
            grouped = await rewards_of(groups)
            scores = [grouped[group][response] for group, response in where]
            # Only these two keys: OpenRLHF 0.8 crashes on an "extra_logs" it cannot concatenate.
            return {"rewards": normalize(scores) if settings.normalize_reward else scores, "scores": scores}

        return await answer(request, handle)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "outstanding": engine.outstanding})

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(
            {**settings.info, "counts": dict(engine.counts), "outstanding": engine.outstanding}
        )

    # Plain Starlette routes: each handler reads and validates its body itself, naming fields its own way.
    for path, endpoint, method in (
        ("/score", score, "POST"),
        ("/get_reward", get_reward, "POST"),
        ("/health", health, "GET"),
        ("/info", info, "GET"),
    ):
        app.add_route(path, endpoint, methods=[method])
    return app


def build_parser() -> argparse.ArgumentParser:
    from training.arguments import ATTENTION_IMPLEMENTATIONS

    parser = argparse.ArgumentParser(
        prog="rewardspeed-serve",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model_name_or_path", required=True, help="saved reward model folder (any layout)")
    add("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    add("--port", type=int, default=8000, help="port (0: any free port; the log names it)")
    add(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="auto: bf16 on a GPU with it, else fp32",
    )
    add("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add(
        "--attn_implementation",
        default="auto",
        choices=ATTENTION_IMPLEMENTATIONS,
        help="as in training: the backbone's attention (auto: transformers' default)",
    )
    add(
        "--max_seq_len",
        type=int,
        default=2048,
        help="longest prompt + response; longer ones truncated as in training",
    )
    add(
        "--max_batch_tokens",
        type=int,
        default=8192,
        help="computed tokens per micro-batch (a shared prompt once)",
    )
    add(
        "--max_wait_ms",
        type=float,
        default=5.0,
        help="how long a queued response waits for its micro-batch to fill",
    )
    add("--max_queue", type=int, default=4096, help="responses queued or being scored at most (503 beyond)")
    add("--request_timeout_s", type=float, default=120.0, help="a request not scored by then gets 504")
    add("--max_request_mb", type=float, default=16.0, help="largest request body (413 beyond)")
    add("--max_text_chars", type=int, default=200_000, help="longest prompt or response text (413 beyond)")
    add("--max_connections", type=int, default=1024, help="open connections at most (plain 503 beyond)")
    add("--num_threads", type=int, default=None, help="torch threads for the model (default: torch's)")
    add(
        "--packing",
        default="auto",
        choices=("auto", "on", "off"),
        help="as in training: packed micro-batches",
    )
    add("--share_prompt", default="auto", choices=("auto", "on", "off"), help="as in training: prompts once")
    add(
        "--normalize_reward",
        action="store_true",
        help="/get_reward 'rewards' normalised with the saved mean/std",
    )
    add("--trust_remote_code", action="store_true", help="allow custom modeling code from the model folder")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the flags; a bad value exits with status 2 and a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    positive = (
        "max_seq_len", "max_batch_tokens", "max_queue", "request_timeout_s", "max_request_mb", "max_text_chars",
        "max_connections",
    )  # fmt: skip
    problems = [f"--{name} must be positive" for name in positive if getattr(args, name) <= 0]
    if args.max_wait_ms < 0:
        problems.append("--max_wait_ms must not be negative")
    if not 0 <= args.port < 65536:
        problems.append("--port must be in 0..65535")
    if args.num_threads is not None and args.num_threads < 1:
        problems.append("--num_threads must be positive")
    if problems:
        parser.error("; ".join(problems))
    return args


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (bound here, so a taken port is a one-line error, and port 0 works)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family)


def draining_server(config, engine):
    """uvicorn's server, whose SIGTERM/SIGINT also tells the engine to stop waiting for micro-batches to fill,
    so the requests it drains are answered at once."""
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # A signal handler must not take the engine's lock (the interrupted thread may hold it).
            threading.Thread(target=engine.hurry, daemon=True).start()
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def serve(args: argparse.Namespace) -> None:
    """Load, bind, serve until SIGTERM/SIGINT, drain. Raises on bad input (see `main`)."""
    import torch
    import uvicorn

    from training.serve_engine import load_engine
    from training.serve_requests import RequestLimits

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    engine = load_engine(
        args.model_name_or_path,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        packing=args.packing,
        share_prompt=args.share_prompt,
        attn_implementation=args.attn_implementation,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    )
    normalization = model_normalization(engine.reward_model.config)
    if args.normalize_reward and normalization is None:
        raise ValueError(
            f"--normalize_reward: {args.model_name_or_path}/config.json has no reward_mean/reward_std "
            "(training writes them after its final evaluation)"
        )
    dtype = str(next(engine.reward_model.parameters()).dtype).removeprefix("torch.")
    info = {
        "model": args.model_name_or_path,
        "dtype": dtype,
        "device": str(engine.device),
        "max_seq_len": args.max_seq_len,
        "layout": engine.layout.describe(),
        "normalization": normalization and {"reward_mean": normalization[0], "reward_std": normalization[1]},
        "max_batch_tokens": args.max_batch_tokens,
        "max_wait_ms": args.max_wait_ms,
        "max_queue": args.max_queue,
        "request_timeout_s": args.request_timeout_s,
    }
    limits = RequestLimits(int(args.max_request_mb * (1 << 20)), args.max_text_chars, args.max_queue)
    settings = ServeSettings(limits, args.request_timeout_s, normalization, args.normalize_reward, info)
    try:
        listener = bind(args.host, args.port)
    except OSError as error:
        raise OSError(
            f"--host {args.host} --port {args.port}: cannot listen there ({error.strerror or error})"
        ) from None
    host, port = listener.getsockname()[:2]
    config = uvicorn.Config(
        build_app(engine, settings),
        log_config=None,
        access_log=False,
        lifespan="on",
        limit_concurrency=args.max_connections,
        # In-flight requests end by themselves within the request timeout: let them, then stop.
        timeout_graceful_shutdown=int(args.request_timeout_s) + 5,
    )
    server = draining_server(config, engine)
    # uvicorn re-raises the SIGTERM/SIGINT it handled once it has drained; these handlers absorb it, so a
    # drained server exits 0 instead of dying of the signal.
    for handled in (signal.SIGTERM, signal.SIGINT):
        signal.signal(handled, lambda signum, frame: None)
    logger.info(
        "%s (%s, %s) listening on http://%s:%d", args.model_name_or_path, dtype, info["layout"], host, port
    )
    server.run(sockets=[listener])
    logger.info(
        "drained; %d responses scored in %d micro-batches",
        engine.counts["responses"],
        engine.counts["micro_batches"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve; return 0 after a drained shutdown, or 2 with a one-line error on stderr for bad input."""
    from model_utils.checkpoint.errors import CheckpointError
    from training.data.records import DataError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args)
    except (CheckpointError, DataError, OSError, ValueError) as error:
        print(f"rewardspeed-serve: error: {error}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
