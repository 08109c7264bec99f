"""Times llama.cpp (through llama-cpp-python) on a GGUF for `cargo xtask bench worker
--prompt-tokens ... --llama-cpp`: prefill and greedy decode at each prompt length, the same
token ids the worker gets.

Reads a job from the JSON file named on the command line:
    {"model": path, "n_threads": int, "n_ctx": int, "decode_tokens": int,
     "prompts": [[ids], ...]}
and prints one JSON object on stdout:
    {"llama_cpp_python": version,
     "runs": [{"prompt_tokens": int, "prefill_s": float, "decode_s": float, "decoded": int}]}

llama.cpp runs with its defaults otherwise (an F16 KV cache, physical batches of 512), as a user of
llama-cpp-python or llama-server gets it. Decode time is from the first generated token to the
last, as the worker bench counts it.
"""

import json
import sys
import time

import numpy as np

import llama_cpp


def main():
    with open(sys.argv[1]) as f:
        job = json.load(f)
    llm = llama_cpp.Llama(
        model_path=job["model"],
        n_ctx=job["n_ctx"],
        # The logical batch as long as the context: llama-cpp-python keeps one row of scores
        # per position of a batch; physical batches stay llama.cpp's default 512.
        n_batch=job["n_ctx"],
        n_ubatch=512,
        n_threads=job["n_threads"],
        n_threads_batch=job["n_threads"],
        n_gpu_layers=0,
        verbose=False,
    )
    runs = []
    for prompt in job["prompts"]:
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1, :]))
        first = time.perf_counter()
        decoded = 1
        for _ in range(job["decode_tokens"] - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1, :]))
            decoded += 1
        done = time.perf_counter()
        runs.append(
            {
                "prompt_tokens": len(prompt),
                "prefill_s": first - started,
                "decode_s": done - first,
                "decoded": decoded,
            }
        )
    json.dump({"llama_cpp_python": llama_cpp.__version__, "runs": runs}, sys.stdout)


if __name__ == "__main__":
    main()
