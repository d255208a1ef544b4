"""What docs/walkthrough-sd-turbo.md relies on: the shipped GenEval prompts,
the preset's hub ids, and every repository file and command option the walkthrough names."""

import hashlib
import re
import shlex
import subprocess
import sys
from pathlib import Path


from drpo_core.config import load_config
from drpo_core.training.prompts import prompt_metadata, training_prompts

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = ROOT / "docs" / "walkthrough-sd-turbo.md"
GENEVAL = ROOT / "prompts" / "geneval" / "evaluation_metadata.jsonl"


def test_geneval_prompts_are_the_unmodified_upstream_file_with_licence_and_load_with_metadata():
    assert hashlib.sha256(GENEVAL.read_bytes()).hexdigest() == "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"
    assert "MIT License" in (GENEVAL.parent / "LICENSE").read_text() and "Dhruba Ghosh" in (GENEVAL.parent / "LICENSE").read_text()
    cfg = load_config([], [f"prompts.file={GENEVAL}"])
    prompts = training_prompts(cfg.prompts)
    assert len(prompts) == 553 and prompts[0] == "a photo of a bench"
    meta = prompt_metadata(cfg.prompts)
    assert meta["a photo of a bench"]["include"] == [{"class": "bench", "count": 1}]


def test_walkthrough_names_only_files_and_options_that_exist():
    text = WALKTHROUGH.read_text()
    for rel in sorted(set(re.findall(r"(?<![\w/.-])((?:deploy|k8s|prompts|docs)/[\w./-]+\.(?:ya?ml|jsonl|md|txt))", text))):
        assert (ROOT / rel).is_file(), rel
    sets = re.findall(r"--set ([\w.]+)=", text)
    assert sets
    cfg = load_config([ROOT / "deploy" / "configs" / "sd-turbo.yaml"])
    for key in sets:
        node = cfg
        for part in key.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)  # raises on a field that does not exist
    preset_ids = {cfg.model.path, cfg.rewards[0].path, cfg.rewards[0].options["processor_path"]}
    downloaded = set(re.findall(r"hf download ([\w.-]+/[\w.-]+)", text))
    assert preset_ids <= downloaded, preset_ids - downloaded


def test_the_walkthrough_command_line_resolves(tmp_path):
    """The train command of the walkthrough, as print-config (the models are not here): every flag parses."""
    text = WALKTHROUGH.read_text()
    block = re.search(r"drpo train -c deploy/configs/sd-turbo\.yaml(.*?)\n\n", text, re.S).group(1)
    args = shlex.split(block.replace("\\\n", " ").replace("$PWD", str(ROOT)))
    args = [a for a in args[:next((i for i, a in enumerate(args) if a.startswith((">", "&"))), len(args))] if a != "--local"]
    keep, skip = [], False
    for a in args:  # print-config takes -c/--set only
        if skip:
            skip = False
            continue
        if a in ("-o", "--output-dir"):
            skip = True
            continue
        keep.append(a)
    proc = subprocess.run([sys.executable, "-m", "services.cli", "print-config", "-c", "deploy/configs/sd-turbo.yaml", *keep],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "evaluation_metadata.jsonl" in proc.stdout or "pickapic" in proc.stdout
