"""Check lm-evaluation-harness' results against the server's own evaluator and transformers.

lm-evaluation-harness (`lm_eval --model local-completions ... --log_samples`) writes one
`samples_<task>_<date>.jsonl` per task: per document its requests (`arguments`), the server's
answers (`resps`), the filtered answer and the metric. Two comparisons read it:

- generations: lm-eval's text per item against `cold-ray eval --outputs` on the same items
  and decoding — greedy (`cold: false`) or CoLD (`cold: true` / `{alpha, beta}`) — and the
  answer and correctness each scorer drew from it;
- log-likelihoods: each (context, continuation) lm-eval scored, recomputed with transformers
  on the model folder: the continuation tokenized as lm-eval tokenizes it (context and
  continuation encoded whole, split at the context's length; trailing spaces of the context
  moved to the continuation), the sum of its tokens' log-probabilities in fp32, and whether
  each was the argmax (lm-eval's `is_greedy`).

    cold-ray lm-eval generations --samples OUT/gsm8k-greedy --outputs greedy.jsonl
    cold-ray lm-eval loglikelihoods --samples OUT/arc --model ~/.cache/cold-ray/models/...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cold_ray.eval.extract import normalize_number

INVALID = "[invalid]"  # lm-eval's regex filter fallback
DEFAULT_TOLERANCE = 1e-3  # nats per continuation token: a request may differ by this × its tokens


def samples_file(path: str | Path) -> Path:
    """The one `samples_*.jsonl` at or under `path` (an lm-eval --output_path)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    found = sorted(path.rglob("samples_*.jsonl"))
    if len(found) != 1:
        listed = ", ".join(str(f) for f in found) or "none"
        raise FileNotFoundError(
            f"expected one lm-eval samples_*.jsonl under {path}, found {len(found)}: {listed}; "
            "name the file"
        )
    return found[0]


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- generations ---------------------------------------------------------------------------


def _gen_kwargs(sample: dict) -> dict:
    return sample["arguments"]["gen_args_0"]["arg_1"]


def mode_label(cold, modes: list[str]) -> str:
    """The `cold-ray eval` mode a request's `cold` value ran as; `modes` are those in its
    outputs (`true`, or no `cold` on an adapter, means the adapter's defaults: the one CoLD
    mode there)."""
    if cold is False:
        return "greedy"
    if isinstance(cold, dict) and "alpha" in cold and "beta" in cold:
        return f"cold a={cold['alpha']:g} b={cold['beta']:g}"
    colds = [m for m in modes if m.startswith("cold ")]
    if len(colds) != 1:
        raise ValueError(
            f"lm-eval ran with cold={cold!r}: which of cold-ray's modes {modes} is that? "
            "pass --mode"
        )
    return colds[0]


def _answer(text: str | None) -> str | None:
    if text is None or text == INVALID:
        return None
    return normalize_number(text) or text


def generation_agreement(
    samples: list[dict], outputs: list[dict], mode: str | None = None, filter_name: str = "cold-ray"
) -> dict:
    """lm-eval's generations (`samples`, one filter's view) against `cold-ray eval`'s
    (`outputs`, its --outputs lines), item by item."""
    rows = [s for s in samples if s.get("filter") == filter_name]
    if not rows:
        found = sorted({s.get("filter") for s in samples})
        raise ValueError(f"no lm-eval samples for filter {filter_name!r}; the file has {found}")
    modes = sorted({o["mode"] for o in outputs})
    mode = mode or mode_label(_gen_kwargs(rows[0]).get("cold"), modes)
    ours = {o["item"]: o for o in outputs if o["mode"] == mode}
    if not ours:
        raise ValueError(f"cold-ray's outputs have no mode {mode!r}; they have {modes}")
    same = {"text": 0, "answer": 0, "correct": 0}
    lm_right = cr_right = 0
    differences = []
    for s in rows:
        i = s["doc_id"]
        if i not in ours:
            raise ValueError(f"item {i} is in lm-eval's samples but not in cold-ray's outputs")
        o = ours[i]
        text, answer = s["resps"][0][0], _answer(s["filtered_resps"][0])
        right = bool(s["exact_match"])
        checks = {
            "text": text == o["text"],
            "answer": answer == o["pred"],
            "correct": right == o["correct"],
        }
        for k, ok in checks.items():
            same[k] += ok
        lm_right, cr_right = lm_right + right, cr_right + o["correct"]
        if not all(checks.values()):
            differences.append(
                {
                    "item": i,
                    "lm_eval": {"text": text, "answer": answer, "correct": right},
                    "cold_ray": {"text": o["text"], "answer": o["pred"], "correct": o["correct"]},
                }
            )
    n = len(rows)
    return {
        "mode": mode,
        "gen_kwargs": _gen_kwargs(rows[0]),
        "n": n,
        "same_text": same["text"],
        "same_answer": same["answer"],
        "same_correct": same["correct"],
        "lm_eval_accuracy": lm_right / n,
        "cold_ray_accuracy": cr_right / n,
        "agree": not differences,
        "differences": differences,
    }


# ---- log-likelihoods -----------------------------------------------------------------------


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into context and continuation token ids."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n = len(tokenizer(context, add_special_tokens=False).input_ids)
    return whole[:n], whole[n:]


def loglikelihood_reference(model, tokenizer, context: str, continuation: str) -> dict:
    """transformers' log-likelihood of one request, as lm-eval defines it."""
    import torch

    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(ctx) - 1 : -1].float()
    lp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(cont)
    return {
        "loglikelihood": float(lp.gather(1, target[:, None]).sum()),
        "is_greedy": bool((lp.argmax(dim=-1) == target).all()),
        "tokens": len(cont),
    }


def loglikelihood_agreement(
    samples: list[dict], model_dir: str | Path, tolerance: float = DEFAULT_TOLERANCE
) -> dict:
    """Every (context, continuation) in `samples` against transformers on `model_dir`; a
    request agrees when |difference| <= tolerance × its continuation's tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    requests, docs_same_choice, worst = [], 0, None
    for s in samples:
        args = [s["arguments"][k] for k in sorted(s["arguments"], key=lambda k: int(k[9:]))]
        ours, refs = [], []
        for a, resp in zip(args, s["resps"]):
            ll, greedy = resp[0]
            ref = loglikelihood_reference(model, tokenizer, a["arg_0"], a["arg_1"])
            diff = float(ll) - ref["loglikelihood"]
            row = {
                "doc_id": s["doc_id"],
                "continuation": a["arg_1"],
                "tokens": ref["tokens"],
                "lm_eval": float(ll),
                "transformers": ref["loglikelihood"],
                "diff": diff,
                "same_is_greedy": (greedy in (True, "True")) == ref["is_greedy"],
            }
            requests.append(row)
            ours.append(float(ll))
            refs.append(ref["loglikelihood"])
            per_token = abs(diff) / max(1, ref["tokens"])
            if worst is None or per_token > worst["per_token"]:
                worst = {**row, "per_token": per_token}
        docs_same_choice += ours.index(max(ours)) == refs.index(max(refs))
    within = sum(abs(r["diff"]) <= tolerance * max(1, r["tokens"]) for r in requests)
    return {
        "model": str(model_dir),
        "docs": len(samples),
        "requests": len(requests),
        "tokens": sum(r["tokens"] for r in requests),
        "tolerance_per_token": tolerance,
        "within_tolerance": within,
        "max_abs_diff": max((abs(r["diff"]) for r in requests), default=0.0),
        "max_abs_diff_per_token": worst["per_token"] if worst else 0.0,
        "same_is_greedy": sum(r["same_is_greedy"] for r in requests),
        "docs_same_choice": docs_same_choice,  # the likeliest continuation is the same one
        "agree": within == len(requests),
        "worst": worst,
        "per_request": requests,
    }


# ---- the command ---------------------------------------------------------------------------


def _print(result: dict, as_json: bool, summary: str) -> int:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(summary)
    return 0 if result["agree"] else 1


def _generations(args: argparse.Namespace) -> int:
    try:
        samples = read_jsonl(samples_file(args.samples))
        r = generation_agreement(samples, read_jsonl(args.outputs), args.mode, args.filter)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [
        f"{r['mode']} (lm-eval gen_kwargs {json.dumps(r['gen_kwargs'])}), n={r['n']}: "
        f"same text {r['same_text']}/{r['n']}, same answer {r['same_answer']}/{r['n']}, "
        f"same correctness {r['same_correct']}/{r['n']}; accuracy lm-eval "
        f"{r['lm_eval_accuracy']:.3f}, cold-ray {r['cold_ray_accuracy']:.3f}"
    ]
    for d in r["differences"][:5]:
        ours, theirs = d["cold_ray"], d["lm_eval"]
        text = "same text" if ours["text"] == theirs["text"] else "texts differ"
        lines.append(
            f"  item {d['item']}: {text}; answer {theirs['answer']} (lm-eval) vs "
            f"{ours['answer']} (cold-ray), correct {theirs['correct']} vs {ours['correct']}"
        )
    return _print(r, args.json, "\n".join(lines))


def _loglikelihoods(args: argparse.Namespace) -> int:
    from cold_ray.model.loader import resolve_model_path

    try:
        samples = read_jsonl(samples_file(args.samples))
        model = resolve_model_path(args.model)
        r = loglikelihood_agreement(samples, model, args.tolerance)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = (
        f"{r['requests']} requests of {r['docs']} docs ({r['tokens']} continuation tokens) "
        f"against transformers on {r['model']}: {r['within_tolerance']}/{r['requests']} "
        f"within {r['tolerance_per_token']:g} nats per token; max |diff| "
        f"{r['max_abs_diff']:.3g} nats ({r['max_abs_diff_per_token']:.3g} per token); "
        f"is_greedy same {r['same_is_greedy']}/{r['requests']}; likeliest choice same "
        f"{r['docs_same_choice']}/{r['docs']}"
    )
    return _print(r, args.json, summary)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="check lm-evaluation-harness' samples against cold-ray eval and transformers",
    )
    psub = p.add_subparsers(dest="lm_eval_command", required=True)
    g = psub.add_parser("generations", help="lm-eval's generations vs cold-ray eval --outputs")
    g.add_argument("--samples", required=True, help="samples_*.jsonl, or lm-eval's output folder")
    g.add_argument("--outputs", required=True, help="cold-ray eval --outputs JSONL")
    g.add_argument("--mode", help="cold-ray's mode label (default: from lm-eval's `cold`)")
    g.add_argument("--filter", default="cold-ray", help="lm-eval filter whose answers to compare")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_generations)
    ll = psub.add_parser("loglikelihoods", help="lm-eval's log-likelihoods vs transformers")
    ll.add_argument("--samples", required=True, help="samples_*.jsonl, or lm-eval's output folder")
    ll.add_argument("--model", help="HF folder or .gguf the server runs (default: SmolLM2)")
    ll.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="nats per continuation token"
    )
    ll.add_argument("--json", action="store_true", help="one JSON object, every request in it")
    ll.set_defaults(func=_loglikelihoods)
