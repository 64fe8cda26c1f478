#!/usr/bin/env bash
# Peer baseline: llm-compressor in its own virtualenv (.venv-peer), CPU torch only.
#
#     bash benchmarks/peer_setup.sh            # creates or completes /work/main/.venv-peer, prints versions
#
# Idempotent: re-running only installs what is missing. torch is pinned to 2.13.0 (the CPU build on this
# machine's local index) first, then every later install runs under a constraints file holding that pin,
# so nothing can resolve to a newer (CUDA) torch. llm-compressor 0.14.0.1 itself requires
# torch>=2.10,<=2.14.0 and transformers>=5.15,<=5.17 (the main venv has transformers 5.24, hence a
# separate venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEER_VENV:-$ROOT/.venv-peer}"
PY="${PYTHON:-python3}"
TORCH_VERSION=2.13.0
LLMC_SPEC="${LLMC_SPEC:-llmcompressor==0.14.*}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

CONSTRAINTS="$VENV/peer-constraints.txt"
cat > "$CONSTRAINTS" <<EOF
torch==$TORCH_VERSION
EOF
# Keep this machine's own pip cap (if any) in force alongside ours.
EXTRA_C=()
if [ -f /etc/xdg/pip/constraints.txt ]; then
    EXTRA_C=(-c /etc/xdg/pip/constraints.txt)
fi

# 1. torch first, exactly pinned (never a range that admits a CUDA wheel).
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    "${PIP[@]}" install -q "torch==$TORCH_VERSION" -c "$CONSTRAINTS" "${EXTRA_C[@]}"
fi

# 2. llm-compressor and its dependencies, under the torch pin.
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; v = m.version('llmcompressor'); sys.exit(0 if v.startswith('0.14') else 1)" 2>/dev/null; then
    "${PIP[@]}" install -q "$LLMC_SPEC" psutil -c "$CONSTRAINTS" "${EXTRA_C[@]}"
fi

# 3. Guard: the torch pin survived and it is the CPU build.
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as m
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert torch.version.cuda is None, f"CUDA torch was installed: {torch.__version__}"
for name in ["torch", "llmcompressor", "compressed-tensors", "transformers", "accelerate", "datasets",
             "safetensors", "auto-round", "numpy", "psutil"]:
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name}: not installed")
EOF
