"""kiln push OUT ORG/NAME: share an artifact on the Hugging Face hub (verified first, with a generated model card)."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("push", help="upload an artifact to the Hugging Face hub; run it anywhere with "
                       "kiln run ORG/NAME or kiln.pipeline(task, 'ORG/NAME')")
    p.add_argument("artifact", help="artifact directory (from kiln export)")
    p.add_argument("repo_id", help="hub repository, org/name (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to push to (created when missing; default main)")
    p.add_argument("--include-engines", action="store_true",
                   help="also upload engines/*.plan (each runs on one GPU model and TensorRT version only)")
    p.set_defaults(func=run)


def run(args) -> int:
    import kiln

    url = kiln.push_to_hub(args.artifact, args.repo_id, private=args.private, revision=args.revision,
                           include_engines=args.include_engines)
    print(f"{args.artifact} -> {url}")
    return 0
