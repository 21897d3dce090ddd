"""``pipx-llama push MODEL [REGISTRY/]NAMESPACE/NAME[:TAG]``: put a runnable model into an OCI registry
in ollama's layout, so a lab's registry serves it to every machine (``pull``/``run``/``serve`` of the
same reference) and ollama can pull it too.

MODEL is anything ``run`` takes (a name, alias or GGUF path, or ``-m FILE``): it is prepared on the
same road first, then its GGUF pushed; blobs the registry already holds are not sent again.
"""

from __future__ import annotations

import argparse

from pipx_llama.cli import road
from pipx_llama.cli import store_common as common
from pipx_llama.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="push a model to an OCI registry (ollama's layout)",
        description="Prepare MODEL as `run` would, then push its GGUF to an OCI registry as an image in "
        "ollama's layout (config, model and license layers). Credentials: the config's "
        "[registry_credentials] table, else Docker's config.json (`docker login`).",
    )
    p.add_argument("model", nargs="?", default=None, help="model name, alias or GGUF path (or -m FILE)")
    p.add_argument("dest", help="where to push: [REGISTRY/]NAMESPACE/NAME[:TAG]")
    p.add_argument("-m", "--model-file", default=None, metavar="PATH.gguf", help="push this GGUF file")
    road.add_road_options(p)
    common.add_json(p)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from pipx_llama.models.oci import push_gguf
    from pipx_llama.models.reference import parse_reference

    dest = parse_reference(args.dest)
    if dest.kind != "oci":
        raise UsageError(f"{args.dest} is not an OCI reference ({dest.describe()})",
                         "give [REGISTRY/]NAMESPACE/NAME[:TAG], e.g. 127.0.0.1:5000/lab/smollm2:135m")
    ref = road.reference(args, args.model)
    runnable = road.ready(args, ref)
    options = common.pull_options(args, road._session(args))
    result = push_gguf(runnable.path, dest, options)
    if args.json:
        print(json.dumps({"kind": "result", "reference": result.reference, "digest": result.digest,
                          "uploaded": result.uploaded, "blobs": result.blobs}))
    else:
        sys.stdout.write(f"pushed {runnable.name} to {result.reference} ({result.digest}; "
                         f"{result.uploaded} of {result.blobs} blobs uploaded)\n")
    return 0
