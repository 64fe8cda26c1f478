"""The streaming prune job: shards -> block -> activations -> statistics -> mask -> writer -> job state.

Only one decoder block's weights are materialized at a time (plus one being read ahead and one being
written, in background threads). Everything that determines the output is fingerprinted in the job state,
each block is committed atomically, and an interrupted job continues from its last committed block.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .activations import TIERS, make_store
from .calibration import calibration_windows
from .distributed import Dist
from .errors import Interrupted, StreamPruneError
from .job import Job, diff
from .memory import MemoryMonitor, Timers, human_bytes, return_freed_memory_to_os
from .model import StreamedModel, block_output, checkpoint_names, load_config, release, set_tensor
from .plan import block_shape, itemsize, make_plan, parse_size
from .shards import Checkpoint
from .methods import ChannelMoments, HessianStats, dsnot_refine, owl_outlier_ratio, owl_sparsities, ria_mask, sparsegpt_prune
from .wanda import InputStats, Structure, magnitude_mask, wanda_mask
from .writer import _Atomic, copy_side_files, file_sha256, shard_name, write_index, write_shard

METHODS = ("wanda", "magnitude", "ria", "sparsegpt")
REFINES = (None, "dsnot")
PROFILES = ("uniform", "owl")
SNAPSHOT_READ_BPS = 500e6  # a conservative sequential read speed for choosing snapshot vs replay on resume
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class PruneOptions:
    sparsity: float = 0.5
    structure: str = "unstructured"
    method: str = "wanda"
    calib: str | None = None
    nsamples: int = 128
    seqlen: int | None = None       # default: min(2048, model context)
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None         # default: checkpoint dtype on GPU, float32 on CPU
    batch_size: int = 1
    activations: str = "auto"
    snapshot_every: int = 8
    overwrite: bool = False
    restart: bool = False
    overlap: bool = True
    progress: bool = True
    attn_implementation: str = "sdpa"
    gpu_memory_limit: str | int | None = None
    refine: str | None = None           # "dsnot": mask refinement after the wanda/ria mask
    sparsity_profile: str = "uniform"   # "owl": per-block sparsity from a dense outlier sweep
    owl_lambda: float = 0.08
    owl_m: float = 5.0

    # options that change the output bytes; the rest (tier, progress, overlap, snapshots) do not
    RESULT_KEYS = ("sparsity", "structure", "method", "nsamples", "seqlen", "seed", "dtype", "batch_size",
                   "attn_implementation", "refine", "sparsity_profile", "owl_lambda", "owl_m")


# ---------------------------------------------------------------------------------------------- helpers

def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise StreamPruneError(f"--device {spec!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StreamPruneError(f"--device {spec}: CUDA is not available on this machine")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise StreamPruneError(f"--device {spec}: no such GPU (this machine has {torch.cuda.device_count()})")
    elif dev.type != "cpu":
        raise StreamPruneError(f"--device {spec}: only cpu and cuda devices are supported")
    return dev


def context_length(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def check_paths(model_dir: Path, out: Path) -> None:
    if not model_dir.is_dir():
        raise StreamPruneError(f"{model_dir}: no such model directory")
    m, o = model_dir.resolve(), out.resolve()
    if o == m or m in o.parents:
        raise StreamPruneError(f"OUT {out} is the model directory or inside it; choose a directory elsewhere")
    if o in m.parents:
        raise StreamPruneError(f"OUT {out} contains the model directory; choose a directory elsewhere")
    if out.exists() and not out.is_dir():
        raise StreamPruneError(f"OUT {out} exists and is not a directory")


def check_out_usable(out: Path, overwrite: bool) -> None:
    """An OUT that holds something other than a streamprune job is refused unless --overwrite."""
    from .job import Job

    if out.is_dir() and not Job.exists(out) and any(out.iterdir()) and not overwrite:
        raise StreamPruneError(f"OUT {out} is not empty; choose an empty directory or add --overwrite")


class _Signals:
    """SIGINT/SIGTERM set a flag; the job stops at the next safe point. A second SIGINT aborts at once."""

    def __init__(self):
        self.received = self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class _Faults:
    """Test hook: STREAMPRUNE_FAULT_AT=event:k sends STREAMPRUNE_FAULT_SIGNAL (default KILL) to this process
    at the k-th occurrence of a named point, so tests kill a real job at an exact place."""

    def __init__(self, rank: int = 0):
        spec = os.environ.get("STREAMPRUNE_FAULT_AT")
        if os.environ.get("STREAMPRUNE_FAULT_RANK", str(rank)) != str(rank):
            spec = None  # STREAMPRUNE_FAULT_RANK=r: only rank r is hit
        self.event, self.k = (spec.rsplit(":", 1)[0], int(spec.rsplit(":", 1)[1])) if spec else (None, 0)
        self.sig = getattr(signal, "SIG" + os.environ.get("STREAMPRUNE_FAULT_SIGNAL", "KILL"))
        self.seen = 0

    def __call__(self, event: str, detail: str = "") -> None:
        if event == "before_rename":
            event = ("rename_state" if detail == "state.json" else "rename_index" if detail.endswith(".index.json")
                     else "rename_shard" if detail.endswith(".safetensors") else "rename_file")
        if event != self.event:
            return
        self.seen += 1
        if self.seen == self.k:
            os.kill(os.getpid(), self.sig)


# ---------------------------------------------------------------------------------------------- the job

class PruneJob:
    def __init__(self, model: str | os.PathLike, out: str | os.PathLike, opts: PruneOptions, log=None):
        self.t0 = time.perf_counter()
        return_freed_memory_to_os()
        self.model_dir, self.out, self.opts = Path(model), Path(out), opts
        self.log = log or (lambda msg: tqdm.write(msg, file=__import__("sys").stderr))
        self.faults = _Faults(int(os.environ.get("RANK", "0")))
        self.timers = Timers()
        self._validate_options()
        check_paths(self.model_dir, self.out)
        check_out_usable(self.out, opts.overwrite)
        self.device = resolve_device(opts.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ and opts.device in ("auto", "cuda"):
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per rank under torchrun
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dist = Dist.from_env(self.device)
        if not self.dist.main:
            self.log = lambda msg: None
            opts.progress = False
        self.gpu_limit = parse_size(opts.gpu_memory_limit)
        if self.gpu_limit and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.gpu_limit / total), self.device)
        self.config = load_config(self.model_dir)
        self.ckpt = Checkpoint(self.model_dir)
        self.ckpt_dtype = self.ckpt.dtype
        self.dtype = DTYPES[opts.dtype] if opts.dtype else (self.ckpt_dtype if self.device.type == "cuda" else torch.float32)
        self.model = StreamedModel(self.config, self.ckpt, self.device, self.dtype, opts.attn_implementation)
        self.skeleton, self.blocks_name, self.blocks = self.model.skeleton, self.model.blocks_name, self.model.blocks
        self.structure = Structure.parse(opts.structure)
        self._check_tensors()
        self.needs_data = opts.method != "magnitude"
        context = context_length(self.config)
        if opts.seqlen is None:
            opts.seqlen = min(2048, context or 2048)
        elif context and opts.seqlen > context:
            raise StreamPruneError(f"--seqlen {opts.seqlen} is beyond the model's context ({context} tokens)")
        self.windows = None
        if self.needs_data:
            if not opts.calib:
                raise StreamPruneError(f"--method {opts.method} needs calibration text: give --calib FILE")
            text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
            vocab = text.vocab_size
            self.windows = calibration_windows(opts.calib, self.model_dir, opts.nsamples, opts.seqlen, opts.seed, vocab)
        self.total_shards = len(self.blocks) + 1
        n, b = opts.nsamples, opts.batch_size
        self.batches = [(j, min(n, j + b)) for j in range(0, n, b)]  # global, in calibration order
        self.local_batches = self.dist.share(self.batches)           # this rank's contiguous share
        if self.dist.enabled and not self.local_batches:
            raise StreamPruneError(f"{self.dist.world} ranks but only {len(self.batches)} calibration batches; "
                                   f"use fewer ranks or more --nsamples")
        self.local_base = self.local_batches[0][0] if self.local_batches else 0
        self.local_n = sum(j1 - j0 for j0, j1 in self.local_batches)
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        self.hidden = text.hidden_size

    def _validate_options(self) -> None:
        o = self.opts
        if o.method not in METHODS:
            raise StreamPruneError(f"--method {o.method!r}: choose one of {', '.join(METHODS)}")
        if o.refine not in REFINES:
            raise StreamPruneError(f"--refine {o.refine!r}: the only refinement is dsnot")
        if o.refine and o.method not in ("wanda", "ria"):
            raise StreamPruneError(f"--refine dsnot refines a wanda or ria mask, not --method {o.method}")
        if o.sparsity_profile not in PROFILES:
            raise StreamPruneError(f"--sparsity-profile {o.sparsity_profile!r}: choose uniform or owl")
        if o.sparsity_profile == "owl" and Structure.parse(o.structure).is_nm:
            raise StreamPruneError("--sparsity-profile owl varies unstructured sparsity per block; it does not apply to N:M")
        if o.sparsity_profile == "owl" and o.method == "magnitude":
            raise StreamPruneError("--sparsity-profile owl needs calibration statistics; use it with wanda, ria or sparsegpt")
        if o.sparsity_profile == "owl" and not 0 <= o.owl_lambda < min(o.sparsity, 1 - o.sparsity):
            raise StreamPruneError(f"--owl-lambda {o.owl_lambda}: must be in [0, {min(o.sparsity, 1 - o.sparsity)}) "
                                   f"so every block's sparsity stays in (0, 1)")
        if not 0 < o.sparsity < 1:
            raise StreamPruneError(f"--sparsity {o.sparsity}: must be strictly between 0 and 1")
        if o.dtype and o.dtype not in DTYPES:
            raise StreamPruneError(f"--dtype {o.dtype!r}: choose float32, bfloat16 or float16")
        if o.activations not in TIERS:
            raise StreamPruneError(f"--activations {o.activations!r}: choose one of {', '.join(TIERS)}")
        for name in ("nsamples", "batch_size"):
            if getattr(o, name) < 1:
                raise StreamPruneError(f"--{name.replace('_', '-')} must be at least 1")
        if o.seqlen is not None and o.seqlen < 2:
            raise StreamPruneError("--seqlen must be at least 2")
        if o.snapshot_every < 0:
            raise StreamPruneError("--snapshot-every must be 0 (never) or more")
        Structure.parse(o.structure)

    def _check_tensors(self) -> None:
        """Every tensor the model needs is in the checkpoint with the shape the config implies."""
        skip = self._output_embedding_names()
        for name in checkpoint_names(self.skeleton):
            if name in skip and name not in self.ckpt.tensors:
                continue
            info = self.ckpt.tensors.get(name)
            if info is None:
                raise StreamPruneError(f"{self.model_dir}: tensor {name} is missing from the checkpoint")
            expected = tuple(self.skeleton.get_parameter(name).shape) if name in dict(self.skeleton.named_parameters()) \
                else tuple(self.skeleton.get_buffer(name).shape)
            if info.shape != expected:
                raise StreamPruneError(f"{self.model_dir}: tensor {name} has shape {list(info.shape)}, "
                                       f"the config implies {list(expected)}")
        for lin in (m for m in self.blocks[0].modules() if isinstance(m, torch.nn.Linear)):
            from .wanda import check_prunable
            check_prunable(lin.in_features, self.structure)

    def _output_embedding_names(self) -> set:
        return {n for n in checkpoint_names(self.skeleton) if self.model.in_head(n)}

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_name}.{i}."

    def block_tensor_names(self, i: int) -> list[str]:
        prefix = self.block_prefix(i)
        return sorted(n for n in self.ckpt.tensors if n.startswith(prefix))

    def other_tensor_names(self) -> list[str]:
        prefix = self.blocks_name + "."
        return sorted(n for n in self.ckpt.tensors if not n.startswith(prefix))

    # ------------------------------------------------------------------ fingerprint and job state

    def fingerprint(self) -> dict:
        import hashlib

        import transformers

        o = self.opts
        options = {k: getattr(o, k) for k in PruneOptions.RESULT_KEYS}
        options.update(dtype=str(self.dtype).replace("torch.", ""), structure=str(self.structure),
                       device_type=self.device.type, ranks=self.dist.world)
        fp = {
            "checkpoint": self.ckpt.fingerprint(),
            "config_sha256": hashlib.sha256((self.model_dir / "config.json").read_bytes()).hexdigest(),
            "options": options,
            "versions": {"streamprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        }
        if self.windows is not None:
            fp["calibration_sha256"] = hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()
        return fp

    def open_job(self) -> tuple[Job, bool]:
        """A fresh job, or the existing one when its fingerprint matches. Returns (job, resumed)."""
        fp = self.fingerprint()
        if Job.exists(self.out):
            job = Job.load(self.out)
            if self.opts.restart or self.opts.overwrite:
                self._clear_out()
            else:
                changes = diff(job.data["fingerprint"], fp)
                if changes:
                    raise StreamPruneError(f"{self.out} holds a job with different inputs ({'; '.join(changes[:4])}); "
                                           f"rerun with the original arguments to resume, or add --restart to discard it")
                return job, True
        elif self.out.exists() and any(self.out.iterdir()):
            if not self.opts.overwrite:
                raise StreamPruneError(f"OUT {self.out} is not empty; choose an empty directory or add --overwrite")
            self._clear_out()
        self.out.mkdir(parents=True, exist_ok=True)
        options = {k: v for k, v in asdict(self.opts).items() if k not in ("overwrite", "restart", "progress")}
        options["model"] = str(self.model_dir.resolve())
        options["calib"] = str(Path(self.opts.calib).resolve()) if self.opts.calib else None
        return Job.create(self.out, fp, options, len(self.blocks)), False

    def _clear_out(self) -> None:
        for entry in self.out.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def _verify_committed(self, job: Job) -> int:
        """Check the committed files; a missing or altered one rolls the job back to before it."""
        other = shard_name(0, self.total_shards)
        if other not in job.data["files"] or not self._file_ok(other, job.data["files"][other]):
            job.data["files"].pop(other, None)
            job.data["blocks"] = {}
            return 0
        n = job.committed
        for i in range(n):
            name = job.data["blocks"][str(i)]["file"]
            if not self._file_ok(name, job.data["files"].get(name, {})):
                self.log(f"resume: {name} is missing or altered; redoing from block {i}")
                for j in range(i, n):
                    job.data["blocks"].pop(str(j), None)
                return i
        return n

    def _file_ok(self, name: str, meta: dict) -> bool:
        path = self.out / name
        return bool(meta) and path.is_file() and path.stat().st_size == meta["size"] and file_sha256(path) == meta["sha256"]

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        t0 = self.t0
        with _Signals() as sigs, MemoryMonitor(device=self.device) as mon:
            self.signals = sigs
            data, resumed = self.dist.agree(lambda: (lambda j, r: (j.data, r))(*self.open_job()))
            job = Job(self.out, data, readonly=not self.dist.main)
            job.rank_suffix = f".rank{self.dist.rank}" if self.dist.enabled else ""
            if job.data["complete"] and (self.out / "model.safetensors.index.json").is_file():
                self.log(f"{self.out}: job already complete; nothing to do")
                return self._summary(job, mon, time.perf_counter() - t0, resumed=True)
            plan = self._plan()
            self.dist.agree(lambda: self._check_disk(job, plan))
            try:
                self._run(job, resumed, plan)
            except torch.cuda.OutOfMemoryError:
                raise StreamPruneError("CUDA out of memory: lower --batch-size, --seqlen or --nsamples, or keep "
                                       "activations off the GPU with --activations cpu (or disk)") from None
            except OSError as e:
                if e.errno == 28:
                    raise StreamPruneError(f"no space left on device while writing to {self.out}; free space and run "
                                           f"`streamprune resume {self.out}` to continue") from None
                raise
            finally:
                if self.gpu_limit and self.device.type == "cuda":
                    torch.cuda.set_per_process_memory_fraction(1.0, self.device)  # the cap was this job's only
        return self._summary(job, mon, time.perf_counter() - t0, resumed=resumed, plan=plan)

    def _plan(self):
        shape = block_shape(self.blocks, self.config)
        gpu_free = None
        if self.device.type == "cuda":
            gpu_free = torch.cuda.mem_get_info(self.device)[0]
            if self.gpu_limit:
                gpu_free = min(gpu_free, self.gpu_limit)
        import psutil
        return make_plan(shape, nsamples=self.opts.nsamples, seqlen=self.opts.seqlen, batch=self.opts.batch_size,
                         ckpt_itemsize=itemsize(self.ckpt_dtype), compute_itemsize=itemsize(self.dtype),
                         device_type=self.device.type, tier=self.opts.activations, gpu_free=gpu_free,
                         host_free=psutil.virtual_memory().available,
                         checkpoint_bytes=sum(t.nbytes for t in self.ckpt.tensors.values()),
                         needs_activations=self.needs_data, snapshot=self.opts.snapshot_every > 0)

    def _check_disk(self, job: Job, plan) -> None:
        written = sum(m["size"] for m in job.data["files"].values())
        remaining = max(0, plan.disk_bytes - written)
        need = remaining + max(1024 ** 2, remaining // 50)  # margin: 2%, at least 1 MiB
        free = shutil.disk_usage(self.out).free
        if need > free:
            raise StreamPruneError(f"not enough disk space in {self.out}: the job needs {human_bytes(need)} "
                                   f"(pruned shards plus activation cache plus margin), {human_bytes(free)} is free")

    def _run(self, job: Job, resumed: bool, plan) -> None:
        opts = self.opts
        self.tier = plan.tier
        self.row_chunk = plan.row_chunk
        n_blocks = len(self.blocks)
        if resumed:
            start, job.data = self.dist.agree(lambda: (self._verify_committed(job), job.data))
        else:
            start = 0
        other = shard_name(0, self.total_shards)
        if other not in job.data["files"] and self.dist.main:
            with self.timers("write"):
                tensors = {n: self.ckpt.read(n) for n in self.other_tensor_names()}
                job.commit_file(other, write_shard(self.out / other, tensors, self.faults))
                del tensors
                job.save(self.faults)
        if resumed:
            self.log(f"resume: {start} of {n_blocks} blocks already committed")

        self.owl = None
        if self.opts.sparsity_profile == "owl":
            if job.data.get("owl") is None:
                job.data["owl"] = self._owl_sweep()
                job.save(self.faults)
            self.owl = job.data["owl"]["sparsities"]
            self.log("owl: per-block sparsity " + " ".join(f"{x:.3f}" for x in self.owl))

        inps = outs = kwargs = None
        if self.needs_data and start < n_blocks:
            try:
                inps, outs, kwargs = self._prepare_activations(job, start)
            except _Stop:
                raise Interrupted(f"{self.signals.received or 'SIGTERM'}: stopped before any new block; continue with "
                                  f"`streamprune resume {self.out}`", self.signals.signum or 15) from None

        pool = ThreadPoolExecutor(max_workers=2) if opts.overlap else None
        pending = None  # the block whose shard is being written: committed once the write has finished
        prefetch = None
        bar = tqdm(total=n_blocks, initial=start, desc="blocks", unit="block", disable=not opts.progress, dynamic_ncols=True)
        try:
            for i in range(start, n_blocks):
                if self._stopping():
                    break
                self.faults("block_start")
                t_block, phases_before = time.perf_counter(), dict(self.timers.seconds)
                with self.timers("read"):
                    host = prefetch.result() if prefetch is not None else self._read_block(i)
                    prefetch = None
                    block, originals = self._materialize(i, host)
                    del host
                if pool is not None and i + 1 < n_blocks:
                    prefetch = pool.submit(self._read_block, i + 1)
                try:
                    record = self._prune_block(i, block, inps, outs, kwargs)
                except _Stop:
                    release(block)
                    break
                masks = record.pop("masks")
                tensors = self._block_tensors(i, block, originals, masks) if self.dist.main else None
                del masks
                release(block)
                del originals
                snapshot = self._maybe_snapshot(job, i, outs)
                if pending is not None:
                    self._commit(job, *pending)
                    pending = None
                name = shard_name(i + 1, self.total_shards)
                if not self.dist.main:
                    fut = _Done((None, 0.0))  # rank 0 writes
                elif pool is not None:
                    fut = pool.submit(self._timed_write, name, tensors)
                else:
                    fut = _Done(self._timed_write(name, tensors))
                del tensors
                record["phase_seconds"] = {k: round(v - phases_before.get(k, 0.0), 4)
                                           for k, v in self.timers.seconds.items() if v - phases_before.get(k, 0.0) > 0}
                pending = (i, fut, dict(record, file=name), time.perf_counter() - t_block, snapshot)
                if self.needs_data:
                    inps, outs = outs, inps
                bar.update(1)
                bar.set_postfix(sparsity=f"{record['sparsity']:.3f}")
            if pending is not None:
                self._commit(job, *pending)
                pending = None
            if self._stopping():  # unconditionally: a collective on every rank
                self._save_inputs_on_stop(job, inps)
        finally:
            bar.close()
            if pending is not None:  # an exception escaped: commit the block if its shard made it to disk
                try:
                    self._commit(job, *pending)
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
            if prefetch is not None:
                prefetch.cancel()
            if pool is not None:
                pool.shutdown(wait=True)
            for store in (inps, outs):
                if store is not None:
                    store.close()
        if self.stopped:
            raise Interrupted(f"{self.signals.received or 'SIGTERM'}: stopped with {job.committed} of {n_blocks} blocks committed; "
                              f"continue with `streamprune resume {self.out}`", self.signals.signum or 15)
        if self.dist.main:
            self._publish(job)
        self.dist.barrier()

    def _stopping(self) -> bool:
        """Has a stop been requested (on any rank)? A collective when distributed: call it at the same points
        on every rank."""
        self.stopped = getattr(self, "stopped", False) or self.dist.any(self.signals.received is not None)
        return self.stopped

    def _save_inputs_on_stop(self, job: Job, inps) -> None:
        """On a signal, keep the next block's inputs so the resume needs no recomputation."""
        done = job.committed
        snap = job.data.get("snapshot")
        if inps is None or done == 0 or done == len(self.blocks) or (snap and snap["after_block"] == done - 1):
            return
        job.set_snapshot(done - 1, self._write_snapshot(job, done - 1, inps), self.faults)

    def _timed_write(self, name: str, tensors: dict) -> tuple[dict, float]:
        t = time.perf_counter()
        meta = write_shard(self.out / name, tensors, self.faults)
        return meta, time.perf_counter() - t

    def _commit(self, job: Job, i: int, fut, record: dict, seconds: float, snapshot) -> None:
        """Record block i as committed once its shard is on disk (rank 0 saves; other ranks keep count)."""
        meta, write_seconds = fut.result()
        self.timers.seconds["write"] += write_seconds
        record["phase_seconds"]["write"] = round(write_seconds, 4)
        job.commit_file(record["file"], meta)
        job.data["block_sparsity"][str(i)] = record["sparsity"]
        if snapshot is not None:
            job.data["snapshot"] = snapshot
        job.commit_block(i, record, seconds, self.faults)
        if snapshot is not None and self.dist.main:
            keep = f"activations-after-block-{snapshot['after_block']:05d}"
            for old in job.dir.glob("activations-after-block-*.bin"):
                if not old.name.startswith(keep):
                    old.unlink()

    def _publish(self, job: Job) -> None:
        copy_side_files(self.model_dir, self.out)
        weight_map = {n: shard_name(0, self.total_shards) for n in self.other_tensor_names()}
        for i in range(len(self.blocks)):
            weight_map.update({n: shard_name(i + 1, self.total_shards) for n in self.block_tensor_names(i)})
        total = sum(self.ckpt.tensors[n].nbytes for n in weight_map)
        self.faults("publish")
        write_index(self.out, weight_map, total, self.faults)
        job.finish(self.faults)

    # ------------------------------------------------------------------ one block

    def _read_block(self, i: int) -> dict:
        pin = self.device.type == "cuda"
        return {n: self.ckpt.read(n, pin=pin) for n in self.block_tensor_names(i)}

    def _exact_roundtrip(self) -> bool:
        """Can the written tensors be cast back from the compute copy without losing a bit?"""
        wide = {torch.float32: 2, torch.float64: 3, torch.bfloat16: 1, torch.float16: 1}
        return self.dtype == self.ckpt_dtype or wide.get(self.dtype, 0) > wide.get(self.ckpt_dtype, 9)

    def _materialize(self, i: int, host: dict):
        """Assign block i's tensors (cast to the compute dtype, on the device). Returns (block, originals):
        originals are the checkpoint-dtype host tensors, kept only when the compute copy cannot give them back."""
        block, prefix = self.blocks[i], self.block_prefix(i)
        originals = {}
        keep = not self._exact_roundtrip()
        for local in checkpoint_names(block):
            t = host[prefix + local]
            if keep:
                originals[prefix + local] = t
            set_tensor(block, local, t.to(self.device, self.dtype if t.is_floating_point() else t.dtype, non_blocking=True))
        for name, b in block.named_buffers():
            if b.device != self.device:
                set_tensor(block, name, b.to(self.device))
        return block, originals

    def _block_tensors(self, i: int, block, originals: dict, masks: dict) -> dict:
        """The block's shard contents in the checkpoint dtype: pruned weights, everything else untouched."""
        prefix, out = self.block_prefix(i), {}
        params = dict(block.named_parameters())
        for name in self.block_tensor_names(i):
            local = name[len(prefix):]
            if name in originals and not (self.opts.method == "sparsegpt" and local in masks):
                t = originals[name]
                if local in masks:
                    t = t.masked_fill(masks[local].to(t.device), 0)
            elif local in params:
                t = params[local].detach().to("cpu", self.ckpt.tensors[name].dtype)
            else:  # a checkpoint tensor the model does not use (e.g. a stale persisted buffer): copy as is
                t = self.ckpt.read(name)
            out[name] = t
        return out

    @torch.no_grad()
    def _forward_all(self, block, i: int, inps, outs, kwargs, desc: str) -> None:
        """Run this rank's calibration batches through `block` (outputs to `outs` unless None)."""
        if self._stopping():
            raise _Stop
        base = self.local_base
        for j0, j1 in tqdm(self.local_batches, desc=f"block {i} {desc}", leave=False, disable=not self.opts.progress):
            if not self.dist.enabled and self.signals.received:  # single process: stop within the pass too
                raise _Stop
            self.faults(desc)
            h = inps.read(j0 - base, j1 - base, self.device)
            y = block_output(block, h, kwargs[j1 - j0][i])
            if outs is not None:
                outs.write(j0 - base, y)

    def _prune_block(self, i: int, block, inps, outs, kwargs) -> dict:
        """Statistics pass on the dense block, masks (and weight updates) per linear, propagation pass."""
        linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        stats = None
        if self.needs_data:
            with self.timers("statistics", self.device):
                stats = BlockStatistics(block, moments=self.opts.refine == "dsnot",
                                        hessians=self.opts.method == "sparsegpt", record=self.dist.enabled)
                try:
                    self._forward_all(block, i, inps, None, kwargs, "statistics")
                finally:
                    stats.remove()
                if self.dist.enabled:
                    stats.reduce(self.dist)
        sparsity = self.block_sparsity(i)
        masks, per_linear = {}, {}
        with self.timers("prune", self.device):
            for name, lin in linears.items():
                mask = self._prune_linear(name, lin.weight, stats, sparsity)
                per_linear[name] = {"zeros": int(mask.count_nonzero()), "numel": mask.numel()}
                if not self._exact_roundtrip():  # only then are masks needed again, to zero the originals
                    masks[name + ".weight"] = mask
                del mask
            del stats
        if self.needs_data:
            with self.timers("propagate", self.device):
                self._forward_all(block, i, inps, outs, kwargs, "propagate")
        zeros = sum(v["zeros"] for v in per_linear.values())
        numel = sum(v["numel"] for v in per_linear.values())
        return {"masks": masks, "sparsity": zeros / numel, "target": sparsity, "linears": per_linear}

    def _prune_linear(self, name: str, w: torch.nn.Parameter, stats, sparsity: float) -> torch.Tensor:
        """Zero (and, for SparseGPT, update) one weight in place; return the bool mask of zeroed entries."""
        o, st, chunk = self.opts, self.structure, self.row_chunk
        if o.method == "magnitude":
            mask = magnitude_mask(w, sparsity, st, chunk)
        elif o.method == "wanda":
            mask = wanda_mask(w, stats.scaler[name], sparsity, st, chunk)
        elif o.method == "ria":
            mask = ria_mask(w, stats.scaler[name], sparsity, st, row_chunk=chunk)
        else:  # sparsegpt
            new, mask = sparsegpt_prune(w.data, stats.hessians.pop(name).H, sparsity, st)
            w.data.copy_(new)
            del new
        if o.refine == "dsnot":
            mom = stats.moments[name]
            mask = dsnot_refine(w, mask, mom.sum_mean, mom.var, stats.scaler[name], structure=st, row_chunk=chunk)
        w.data.masked_fill_(mask, 0)
        return mask

    def block_sparsity(self, i: int) -> float:
        return self.owl[i] if self.owl is not None else self.opts.sparsity

    # ------------------------------------------------------------------ activations and resume

    def _new_store(self, tag: str):
        return make_store(self.tier, self.local_n, self.opts.seqlen, self.hidden, self.dtype, self.device,
                          Job(self.out, {}).dir / f"cache-{tag}-rank{self.dist.rank}.bin")

    def _capture(self, only_kwargs: bool):
        """Block-0 inputs (and every block's call arguments) from the model's own forward."""
        with self.timers("capture", self.device):
            batches = [self.windows[j0:j1] for j0, j1 in self.local_batches]
            if only_kwargs:
                batches = list({b.shape[0]: b for b in batches}.values())
            captured = self.model.capture(batches)
        return captured

    def _prepare_activations(self, job: Job, start: int):
        inps, outs = self._new_store("a"), self._new_store("b")
        snap = job.data.get("snapshot")
        usable = snap is not None and snap["after_block"] < start and job.snapshot_path(snap["after_block"]).is_file()
        usable = not self.dist.any(not usable)  # every rank needs its own file
        if usable and start:
            # choose by cost: read the snapshot and replay the blocks after it, or replay every committed block
            fwd = self._forward_seconds(job, start)
            via_snapshot = snap["size"] / SNAPSHOT_READ_BPS + (start - 1 - snap["after_block"]) * fwd
            usable = via_snapshot <= start * fwd
            self.log(f"resume: inputs of block {start} via the snapshot after block {snap['after_block']} "
                     f"(est. {via_snapshot:.1f}s) or by replaying {start} blocks (est. {start * fwd:.1f}s): "
                     f"{'snapshot' if usable else 'replay'}")
        captured = self._capture(only_kwargs=usable)
        kwargs = captured.kwargs
        if usable:
            t = time.perf_counter()
            self._load_snapshot(job.snapshot_path(snap["after_block"]), inps)
            first = snap["after_block"] + 1
            self.log(f"resume: loaded the activations saved after block {snap['after_block']} "
                     f"({human_bytes(snap['size'])}) in {time.perf_counter() - t:.1f}s")
        else:
            for (j0, _), h in zip(self.local_batches, captured.inputs):
                inps.write(j0 - self.local_base, h)
            first = 0
        del captured
        if first < start:
            t = time.perf_counter()
            done = Checkpoint(self.out, [job.data["blocks"][str(i)]["file"] for i in range(first, start)])
            for i in range(first, start):
                host = {n: done.read(n) for n in self.block_tensor_names(i)}
                block, _ = self._materialize(i, host)
                del host
                self._forward_all(block, i, inps, outs, kwargs, "recompute")
                release(block)
                inps, outs = outs, inps
            self.log(f"resume: recomputed the inputs of block {start} through committed blocks {first}-{start - 1} "
                     f"({start - first} forward passes, {time.perf_counter() - t:.1f}s)")
        return inps, outs, kwargs

    @staticmethod
    def _forward_seconds(job: Job, start: int) -> float:
        """Measured seconds of one propagation pass per block, from the committed blocks' records."""
        times = [job.data["blocks"][str(i)].get("phase_seconds", {}).get("propagate", 0.0) for i in range(start)]
        return sum(times) / len(times) if times else 0.0

    @torch.no_grad()
    def _owl_sweep(self) -> dict:
        """OWL's dense sweep: each block's share of outlier Wanda scores, on dense activations, then the
        per-block sparsities (mean = target). One forward per block; restarts from block 0 if interrupted."""
        t = time.perf_counter()
        inps, outs = self._new_store("a"), self._new_store("b")
        try:
            captured = self._capture(only_kwargs=False)
            for (j0, _), h in zip(self.local_batches, captured.inputs):
                inps.write(j0 - self.local_base, h)
            kwargs = captured.kwargs
            del captured
            ratios = []
            for i in tqdm(range(len(self.blocks)), desc="owl sweep", unit="block", disable=not self.opts.progress):
                block, _ = self._materialize(i, self._read_block(i))
                stats = InputStats(block, record=self.dist.enabled)
                try:
                    self._forward_all(block, i, inps, outs, kwargs, "owl")
                finally:
                    stats.remove()
                if self.dist.enabled:
                    stats.reduce(self.dist)
                ratios.append(owl_outlier_ratio([(m.weight, stats.scaler[n]) for n, m in stats.linears.items()],
                                                hyper_m=self.opts.owl_m, row_chunk=self.row_chunk))
                release(block)
                inps, outs = outs, inps
        except _Stop:
            raise Interrupted(f"{self.signals.received or 'SIGTERM'}: stopped during the OWL sweep (it restarts on resume); "
                              f"continue with `streamprune resume {self.out}`", self.signals.signum or 15) from None
        finally:
            inps.close()
            outs.close()
        sparsities = owl_sparsities(ratios, self.opts.sparsity, self.opts.owl_lambda)
        self.timers.seconds["owl_sweep"] += time.perf_counter() - t
        return {"ratios": ratios, "sparsities": sparsities}

    def _maybe_snapshot(self, job: Job, i: int, outs):
        """Every `snapshot_every` blocks (and when interrupted) save the next block's inputs."""
        k = self.opts.snapshot_every
        last = i == len(self.blocks) - 1
        if outs is None or last or not (k and (i + 1) % k == 0):
            return None
        return self._write_snapshot(job, i, outs)

    def _write_snapshot(self, job: Job, i: int, store) -> dict:
        t = time.perf_counter()
        path = job.snapshot_path(i)
        with _Atomic(path, self.faults) as f:
            for j0, j1 in self.local_batches:
                j0, j1 = j0 - self.local_base, j1 - self.local_base
                f.write(memoryview(store.read(j0, j1, "cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.dist.barrier()  # every rank's file is on disk before rank 0 records the snapshot
        self.timers.seconds["snapshot"] += time.perf_counter() - t
        return {"after_block": i, "size": path.stat().st_size}

    def _load_snapshot(self, path: Path, store) -> None:
        hidden = self.hidden
        row = self.opts.seqlen * hidden * itemsize(self.dtype)
        if path.stat().st_size != row * self.local_n:
            raise StreamPruneError(f"{path}: activation snapshot has the wrong size; use --restart")
        with open(path, "rb") as f:
            for j0, j1 in self.local_batches:
                j0, j1 = j0 - self.local_base, j1 - self.local_base
                buf = torch.empty((j1 - j0) * row, dtype=torch.uint8)
                f.readinto(memoryview(buf.numpy()))
                store.write(j0, buf.view(self.dtype).reshape(j1 - j0, self.opts.seqlen, hidden))

    # ------------------------------------------------------------------ summary

    def _summary(self, job: Job, mon: MemoryMonitor, seconds: float, resumed: bool, plan=None) -> dict:
        sp = {int(k): v for k, v in job.data["block_sparsity"].items()}
        zeros = sum(l["zeros"] for b in job.data["blocks"].values() for l in b["linears"].values())
        numel = sum(l["numel"] for b in job.data["blocks"].values() for l in b["linears"].values())
        worst = min(sp, key=sp.get) if sp else None
        out = {
            "model": str(self.model_dir), "out": str(self.out), "method": self.opts.method,
            "structure": str(self.structure), "target_sparsity": self.opts.sparsity,
            "blocks": len(self.blocks), "blocks_committed": job.committed, "resumed": resumed,
            "sparsity": zeros / numel if numel else 0.0,
            "worst_block": {"index": worst, "sparsity": sp[worst]} if worst is not None else None,
            "wall_seconds": seconds, "device": str(self.device), "compute_dtype": str(self.dtype).replace("torch.", ""),
            "activations": getattr(self, "tier", None), "nsamples": self.opts.nsamples, "seqlen": self.opts.seqlen,
            "ranks": self.dist.world, "rank": self.dist.rank,
            "phase_seconds": {k: round(v, 4) for k, v in sorted(self.timers.seconds.items())},
            "block_sparsity": [sp[k] for k in sorted(sp)],
            "block_seconds": [job.data["blocks"][str(k)].get("phase_seconds", {}) for k in sorted(sp)],
        }
        out.update(mon.report())
        if plan is not None:
            out["plan"] = plan.as_dict()
        return out


class BlockStatistics(InputStats):
    """Wanda's per-channel statistics for every linear of a block, plus what the chosen method needs:
    DSnoT's channel moments and SparseGPT's Hessians, all from the same dense pass.

    Data-parallel (`record`): channel statistics are replayed in global batch order (exact); Hessians are
    combined as the sample-weighted sum of every rank's running mean (float32 rounding differs slightly)."""

    def __init__(self, block, moments: bool = False, hessians: bool = False, record: bool = False):
        super().__init__(block, record)
        self.moments, self.hessians, self.moment_records = {}, {}, {}
        for name, lin in self.linears.items():
            dev = lin.weight.device
            if moments:
                self.moments[name] = ChannelMoments(lin.in_features, dev)
                if record:
                    self.moment_records[name] = []
                    hook = (lambda n: lambda mod, args, out: self.moment_records[n].append(
                        tuple(v.cpu() if torch.is_tensor(v) else v for v in ChannelMoments.contribution(args[0]))))(name)
                else:
                    hook = self.moments[name].hook
                self.handles.append(lin.register_forward_hook(hook))
            if hessians:
                self.hessians[name] = HessianStats(lin.in_features, dev)
                self.handles.append(lin.register_forward_hook(self.hessians[name].hook))

    def reduce(self, dist) -> None:
        super().reduce(dist)
        for records in dist.gather(self.moment_records):
            for name, items in records.items():
                dev = self.moments[name].mean.device
                for b, t, *vecs in items:
                    self.moments[name].accumulate(b, t, *(v.to(dev) for v in vecs))
        for hs in self.hessians.values():
            n = hs.nsamples
            hs.H *= n
            dist.sum_(hs.H)
            hs.nsamples = sum(dist.gather(n))
            hs.H /= hs.nsamples


class _Stop(Exception):
    """A signal arrived in the middle of a pass: abandon the block (it is not committed)."""


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def prune(model: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
    """Prune the checkpoint in `model` into `out` (see PruneOptions for the options); returns the summary."""
    log = options.pop("log", None)
    return PruneJob(model, out, PruneOptions(**options), log=log).run()
