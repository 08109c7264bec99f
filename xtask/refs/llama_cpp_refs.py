"""Runs llama.cpp (through llama-cpp-python) on generated models for `cargo xtask refs`.

Reads a job from the JSON file named on the command line:
    {"n_threads": int, "top_k": int,
     "cases": [{"name": str, "model": path, "prompt": [ids], "steps": int, "n_ctx": int},
               ...]}
(n_ctx 0: the model's trained context)
and prints one JSON object on stdout:
    {"llama_cpp_python": version, "n_ctx": {name: int},
     "cases": {name: [{"argmax": id, "top": [[id, logit], ...]}, ...]}}

Each case evaluates its prompt ids, then decodes greedily: at every step it records the
argmax and the top-k logits of the last position, and feeds the argmax back. The KV cache is
F32 and flash attention is off, so the reference is llama.cpp's plain attention with nothing
rounded beyond what the weights' own matrix products do.
"""

import json
import sys

import numpy as np

import llama_cpp

GGML_TYPE_F32 = 0


def run_case(case, n_threads, top_k):
    llm = llama_cpp.Llama(
        model_path=case["model"],
        # 0: the model's trained context, as a default llama.cpp or rbee run gets. Phi-3's
        # LongRoPE factors depend on it (short ones up to the original context, else long).
        n_ctx=case.get("n_ctx", 0),
        n_batch=512,
        n_ubatch=512,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_gpu_layers=0,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        flash_attn=False,
        logits_all=True,
        verbose=False,
    )
    prompt = case["prompt"]
    if len(prompt) + case["steps"] > llm.n_ctx():
        raise SystemExit(
            f"{case['name']}: {len(prompt)} prompt tokens and {case['steps']} steps "
            f"do not fit the context of {llm.n_ctx()}"
        )
    llm.reset()
    llm.eval(prompt)
    steps = []
    for _ in range(case["steps"]):
        logits = np.array(llm.scores[llm.n_tokens - 1, :], dtype=np.float32)
        if not np.all(np.isfinite(logits)):
            raise SystemExit(f"{case['name']}: llama.cpp returned non-finite logits")
        # Stable sort by descending logit: ties go to the lower id, as numpy's argmax does.
        order = np.argsort(-logits, kind="stable")[:top_k]
        best = int(order[0])
        steps.append(
            {
                "argmax": best,
                "top": [[int(i), float(logits[i])] for i in order],
            }
        )
        llm.eval([best])
    n_ctx = llm.n_ctx()
    llm.close()
    return steps, n_ctx


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: llama_cpp_refs.py JOB.json")
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    results = {}
    contexts = {}
    for case in job["cases"]:
        print(f"llama.cpp: {case['name']}", file=sys.stderr, flush=True)
        results[case["name"]], contexts[case["name"]] = run_case(
            case, job["n_threads"], job["top_k"]
        )
    json.dump(
        {
            "llama_cpp_python": llama_cpp.__version__,
            "n_ctx": contexts,
            "cases": results,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
