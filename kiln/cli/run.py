"""kiln run OUT TEXT... | --input FILE.jsonl: run an artifact's pipeline, one JSON line per input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kiln.errors import InputError


def add_parser(sub):
    p = sub.add_parser("run", help="run an artifact on texts; prints one JSON line per input")
    p.add_argument("artifact", help="artifact directory, an artifact on the hub (ORG/NAME, from kiln push), or a "
                   "checkpoint (exported once into the cache)")
    p.add_argument("texts", nargs="*", help="input texts (automatic-speech-recognition: audio files)")
    p.add_argument("--input", metavar="FILE.jsonl", help='one JSON string or {"text": ..., "text_pair": ...} per line; - for stdin')
    p.add_argument("--task", help="task (default: the artifact's); for speech, transcribe or translate (to English)")
    p.add_argument("--timestamps", action="store_true", help="automatic-speech-recognition: segments with their "
                   "start and end times (return_timestamps=True)")
    p.add_argument("--word-timestamps", action="store_true", help="automatic-speech-recognition: every word with "
                   "its start and end times (return_timestamps='word')")
    p.add_argument("--language", help="automatic-speech-recognition: the spoken language (a code such as fr, or a "
                   "name); default: detected")
    p.add_argument("--num-beams", type=int, help="beams to search (automatic-speech-recognition: default 5, as "
                   "transformers' pipeline; text-generation: default 1, the artifact's generation_config.json may say "
                   "more); 1 decodes greedily")
    p.add_argument("--pooling", choices=("mean", "cls"), help="feature-extraction: pool token vectors")
    p.add_argument("--normalize", action="store_true", help="feature-extraction: unit-length pooled vectors")
    p.add_argument("--top-k", type=int,
                   help="text-classification: the k best labels; question-answering: answers; fill-mask: tokens")
    p.add_argument("--question", help="question-answering: the question (with --context); --input takes "
                   '{"question": ..., "context": ...} lines')
    p.add_argument("--context", help="question-answering: the context to answer from")
    p.add_argument("--all-labels", action="store_true", help="text-classification: every label (top_k=None)")
    p.add_argument("--aggregation-strategy", choices=("none", "simple", "first", "average", "max"),
                   help="token-classification: group tokens into words and entities")
    p.add_argument("--targets", nargs="+", metavar="TOKEN", help="fill-mask: score only these tokens")
    p.add_argument("--candidate-labels", nargs="+", metavar="LABEL", help="zero-shot classification: the labels to "
                   "score, of images (CLIP, SigLIP artifacts) or texts (a text-classification artifact of an NLI "
                   "model)")
    p.add_argument("--hypothesis-template", help='zero-shot classification: the hypothesis with {} for the label '
                   '(default "This example is {}.", images "This is a photo of {}.")')
    p.add_argument("--multi-label", action="store_true", help="zero-shot classification: score each label on its "
                   "own instead of one distribution over the labels")
    p.add_argument("--max-new-tokens", type=int, help="text-generation: tokens to generate (default: the artifact's "
                   "generation_config.json, else 20)")
    p.add_argument("--stream", action="store_true", help="text-generation: print text as it is generated; "
                   "automatic-speech-recognition: print each segment (a JSON line with its times) as it is decoded")
    p.add_argument("--sample", action="store_true", help="text-generation: sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="text-generation: sampling temperature")
    p.add_argument("--top-p", type=float, help="text-generation: nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, help="text-generation: seed for reproducible sampling")
    p.add_argument("--prompt-lookup", type=int, metavar="N", help="text-generation: prompt-lookup decoding, N "
                   "candidate tokens copied from the text so far per pass (greedy's output, faster where it copies)")
    p.add_argument("--num-return-sequences", type=int, metavar="N", help="text-generation: N sequences per prompt "
                   "(the N best beams with --num-beams, or N samples with --sample)")
    p.add_argument("--verify", action="store_true", help="check every artifact file against the sha256 in kiln.json "
                   "first; refuse a tampered artifact")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto", "tensorrt"),
                   help="auto: a TensorRT engine from `kiln build` when one fits this machine, else onnxruntime")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.set_defaults(func=run)


def read_inputs(args) -> list:
    items = list(args.texts)
    if args.question is not None or args.context is not None:
        if args.question is None or args.context is None:
            raise InputError("--question and --context go together.")
        items.append({"question": args.question, "context": args.context})
    if args.input:
        stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
        with stream:
            for n, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    items.append(json.loads(line))
                except (ValueError, RecursionError) as err:  # JSONDecodeError, over-long numbers, hostile nesting
                    raise InputError(f"{args.input} line {n} is not JSON ({getattr(err, 'msg', err)}); write one JSON "
                                     "string or object a line.") from None
    if not items:
        raise InputError("No input: give texts as arguments or --input FILE.jsonl.")
    return items


def zero_shot_task(artifact) -> str:
    """The zero-shot task of an artifact given candidate labels: an image + text artifact's, or an NLI text
    classifier's."""
    from kiln.artifact import is_artifact, load_manifest

    if not is_artifact(artifact):
        raise InputError(f"--candidate-labels: {artifact} is not a local artifact, so kiln cannot tell which zero-shot "
                         "task it runs; give --task zero-shot-classification.")
    exported = load_manifest(artifact)["task"]
    if exported == "zero-shot-image-classification":  # CLIP, SigLIP: the inputs are images
        return exported
    if exported != "text-classification":
        raise InputError(f"--candidate-labels needs an image + text artifact (CLIP, SigLIP) or a text-classification "
                         f"artifact of an NLI model; {artifact} was exported for {exported!r}.")
    return "zero-shot-classification"


def run(args) -> int:
    import kiln
    from kiln.artifact import is_artifact

    # An artifact knows its task (a local one, or one on the hub: ORG/NAME); a local checkpoint without --task is read
    # as feature-extraction.
    local_checkpoint = Path(args.artifact).exists() and not is_artifact(args.artifact)
    speech_task = args.task if args.task in ("transcribe", "translate") else None  # Whisper's, not a pipeline's
    task = None if speech_task else args.task or ("feature-extraction" if local_checkpoint else None)
    if args.candidate_labels and task is None:
        task = zero_shot_task(args.artifact)
    # Only the options given reach the pipeline, which refuses those its task does not take.
    options = {"pooling": args.pooling, "normalize": args.normalize or None, "top_k": args.top_k,
               "aggregation_strategy": args.aggregation_strategy, "targets": args.targets,
               "max_new_tokens": args.max_new_tokens, "do_sample": args.sample or None,
               "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "num_beams": args.num_beams,
               "prompt_lookup_num_tokens": args.prompt_lookup, "num_return_sequences": args.num_return_sequences,
               "candidate_labels": args.candidate_labels, "hypothesis_template": args.hypothesis_template,
               "multi_label": args.multi_label or None}
    options = {name: value for name, value in options.items() if value is not None}
    if args.all_labels:
        options["top_k"] = None  # text-classification: every label
    if args.timestamps and args.word_timestamps:
        raise InputError("--timestamps and --word-timestamps: give one (segments, or words).")
    if args.stream and args.word_timestamps:
        raise InputError("--stream prints segments as they are decoded; --word-timestamps prints every word once the "
                         "audio is done. Give one.")
    if args.timestamps or args.word_timestamps:
        options["return_timestamps"] = "word" if args.word_timestamps else True
    speech = {name: value for name, value in (("language", args.language), ("task", speech_task)) if value}
    if speech:
        options["generate_kwargs"] = speech
    pipe = kiln.pipeline(task, args.artifact, device=args.device, threads=args.threads, verify=args.verify, **options)
    items = read_inputs(args)
    if args.stream:
        return stream(pipe, items)
    results = pipe(items)
    if pipe.task in ("question-answering", "fill-mask") and len(items) == 1:
        results = [results]  # a one-item list gives that item's result, not a list of one (as transformers)
    for item, result in zip(items, results):
        print(json.dumps({"input": item, "output": result}, ensure_ascii=False))
    return 0


def stream(pipe, items: list) -> int:
    """Print each prompt's continuation as it is generated (plain text, one prompt after another); for speech, each
    segment as a JSON line ``{"input", "timestamp", "text"}`` as its window is decoded."""
    if not hasattr(pipe, "stream"):
        raise InputError(f"--stream is for text-generation and automatic-speech-recognition; this artifact is "
                         f"{pipe.task}.")
    if pipe.task == "automatic-speech-recognition":
        for item in items:
            for chunk in pipe.stream(item):
                print(json.dumps({"input": item, **chunk}, ensure_ascii=False), flush=True)
        return 0
    for item in items:
        if isinstance(item, str):
            print(item, end="", flush=True)
        for piece in pipe.stream(item):
            print(piece, end="", flush=True)
        print(flush=True)
    return 0
