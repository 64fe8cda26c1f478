"""Where llm-compressor's Wanda masks differ from streamprune's, and whether the transformers version explains it.

The throughput job's outputs (SmolLM2-135M, 16 x 256 wikitext-2 windows, 50% Wanda, float32): streamprune, the
in-memory reference in this venv, llm-compressor in its venv (.venv-peer, its own transformers), and the
in-memory reference run by the peer venv's interpreter and transformers. Prints tensor and mask-entry
differences between each pair. Not timed.

    python benchmarks/peer_diff.py        # needs .venv-peer (bash benchmarks/peer_setup.sh)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))


def main() -> int:
    import throughput as T
    from streamprune.calibration import calibration_windows
    from streamprune.demo import build_smollm2

    work = Path("/tmp/streamprune-peer-diff")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = build_smollm2()
    calib = work / "windows.jsonl"
    ids = calibration_windows(T.WIKITEXT, model, 16, 256, 0, 49152)
    calib.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids.tolist()))
    for side in ("streamprune", "in_memory", "llm_compressor"):
        subprocess.run(T.side_command(side, model, work / side, calib, 16, 256), check=True, capture_output=True,
                       cwd=REPO)
    subprocess.run([str(T.PEER_PY), str(REPO / "benchmarks" / "throughput.py"), "_in_memory", str(model),
                    str(work / "in_memory_peer_venv"), str(calib), "16", "256"], check=True, capture_output=True,
                   cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    versions = subprocess.run([str(T.PEER_PY), "-c", "import transformers, torch; print(transformers.__version__, "
                               "torch.__version__)"], capture_output=True, text=True, check=True).stdout.split()
    import torch
    import transformers
    print(f"this venv: transformers {transformers.__version__}, torch {torch.__version__}; "
          f"peer venv: transformers {versions[0]}, torch {versions[1]}")
    for a, b in [("streamprune", "in_memory"), ("streamprune", "in_memory_peer_venv"),
                 ("llm_compressor", "in_memory_peer_venv"), ("streamprune", "llm_compressor")]:
        c = T.compare(work / a, work / b)
        print(f"{a} vs {b}: {c['tensors_differing']} of {c['tensors_compared']} tensors differ, "
              f"{c['mask_entries_differing']} of {c['mask_entries']} mask entries; first: {c['first_differing']}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
