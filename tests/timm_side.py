"""The timm half of tests/test_export_timm.py, run by the timm venv's python (timm imports
torchvision, which loads only beside torch 2.14.1 here, not beside the test venv's 2.13.0 —
see the Makefile). It needs timm, transformers and safetensors, not megavit.

    python tests/timm_side.py make DIR ARGS_JSON INPUTS OUTPUTS
        a random timm model (`timm.create_model(**ARGS_JSON)`, every tensor drawn anew so
        none is a trivial 0 or 1), saved as timm saves for the Hub (safetensors +
        config.json); its logits on INPUTS' "images" written to OUTPUTS
    python tests/timm_side.py run DIR INPUTS OUTPUTS
        `timm.create_model('local-dir:DIR', pretrained=True)` (a strict load) and
        transformers' `TimmWrapperForImageClassification` / `TimmWrapperModel` from DIR (no
        missing, unexpected or mismatched tensor);
        OUTPUTS gets "timm" and "wrapper" (logits, or features without a classifier)
    python tests/timm_side.py serve
        one process for many of the above (timm and transformers import once): each line
        of stdin is a JSON list ["make", ...] / ["run", ...], answered by one line of
        stdout, "ok" or "error: " and the traceback as JSON (whatever the libraries print
        goes to stderr)
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def make(directory: str, args_json: str, inputs: str, outputs: str) -> None:
    import timm
    from timm.models import save_for_hf

    args = json.loads(args_json)
    torch.manual_seed(0)
    model = timm.create_model(pretrained=False, **args).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            scale = 0.5 if ("norm" in name and name.endswith("weight")) else 0.2
            tensor.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, scale)
    save_for_hf(model, directory, safe_serialization=True)
    with torch.no_grad():
        save_file({"timm": model(load_file(inputs)["images"])}, outputs)


def run(directory: str, inputs: str, outputs: str) -> None:
    import timm
    from transformers import TimmWrapperForImageClassification, TimmWrapperModel

    images = load_file(inputs)["images"]
    model = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    config = json.loads(open(f"{directory}/config.json").read())
    with torch.no_grad():
        out = {"timm": model(images)}
        kind = TimmWrapperForImageClassification if config["num_classes"] else TimmWrapperModel
        wrapper, info = kind.from_pretrained(directory, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
        if problems or info.get("error_msgs"):
            sys.exit(f"{kind.__name__} did not load {directory} strictly: {info}")
        result = wrapper.eval()(pixel_values=images)
        out["wrapper"] = result.logits if config["num_classes"] else result.pooler_output
    save_file({k: v.contiguous() for k, v in out.items()}, outputs)


COMMANDS = {"make": make, "run": run}


def serve() -> None:
    import os
    import traceback

    answers = os.fdopen(os.dup(1), "w")   # what the libraries print goes to stderr instead
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        command, *args = json.loads(line)
        try:
            COMMANDS[command](*args)
            answer = "ok"
        except BaseException as e:   # noqa: BLE001 — sys.exit(message) too: told, not fatal
            answer = f"error: {traceback.format_exc()}{e}"
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
