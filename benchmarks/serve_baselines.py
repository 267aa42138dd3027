"""The reward servers RL users run today, as baselines for `bench_serve.py`, on the same ASGI stack and threads.

    python benchmarks/serve_baselines.py --mode pipeline --model_name_or_path DIR --port 0 --num_threads 2
    python benchmarks/serve_baselines.py --mode openrlhf --model_name_or_path DIR --port 0 --dtype bf16

Both answer POST /score `{"prompt", "responses"}` with `{"rewards"}`, like `python -m training.serve`, scoring
the texts `prompt + response + EOS` (the token sequences the rewardspeed server scores, so the answers can be
compared), one request at a time on one model thread (the event loop stays free, as in rewardspeed's server):

- `pipeline`: `transformers.pipeline("text-classification", function_to_apply="none")` called once per request
  on its texts (`--pipeline_batch_size`, default 1: one unpadded forward per text, the pipeline's default).
- `openrlhf`: OpenRLHF's `serve_rm` recipe: the request's texts tokenised together (`add_special_tokens=False`),
  left-padded, truncated at `--max_len`, one forward per request, the reward read at the last position; no
  batching across requests.

The model is the same saved folder, loaded with `AutoModelForSequenceClassification` (what both tools load).
Imports nothing from this project, so it measures the tools as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

logger = logging.getLogger("serve_baselines")


def pipeline_scorer(model, tokenizer, batch_size: int):
    classify = pipeline(
        "text-classification", model=model, tokenizer=tokenizer, function_to_apply="none", device="cpu"
    )

    def score(texts: list[str]) -> list[float]:
        return [output["score"] for output in classify(texts, batch_size=batch_size)]

    return score


def openrlhf_scorer(model, tokenizer, max_len: int):
    tokenizer.padding_side = "left"

    @torch.inference_mode()
    def score(texts: list[str]) -> list[float]:
        batch = tokenizer(
            texts,
            return_tensors="pt",
            add_special_tokens=False,
            padding=True,
            truncation=True,
            max_length=max_len,
        )
        return model(**batch).logits[:, 0].float().tolist()

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("pipeline", "openrlhf"), required=True)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--max_len", type=int, default=2048)
    parser.add_argument("--pipeline_batch_size", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, dtype=dtype).eval()
    if args.mode == "pipeline":
        score = pipeline_scorer(model, tokenizer, args.pipeline_batch_size)
    else:
        score = openrlhf_scorer(model, tokenizer, args.max_len)
    model_thread = ThreadPoolExecutor(1)
    app = FastAPI()

    async def score_endpoint(request) -> JSONResponse:
        body = json.loads(await request.body())
        texts = [body["prompt"] + response + tokenizer.eos_token for response in body["responses"]]
        rewards = await asyncio.get_running_loop().run_in_executor(model_thread, score, texts)
        return JSONResponse({"rewards": rewards})

    async def health(request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app.add_route("/score", score_endpoint, methods=["POST"])
    app.add_route("/health", health, methods=["GET"])
    listener = socket.create_server(("127.0.0.1", args.port))
    logger.info("%s listening on http://127.0.0.1:%d", args.mode, listener.getsockname()[1])
    config = uvicorn.Config(app, log_config=None, access_log=False, limit_concurrency=4096, lifespan="off")
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    main()
