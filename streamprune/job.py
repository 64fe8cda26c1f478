"""The prune job: the units composed in the order data flows through them.

shards -> block -> activations -> statistics -> mask -> writer -> job state: `run` below reads top to bottom
as that flow. Only one decoder block's weights are in memory at a time (plus the next one being read and the
previous one being written, see io.py); every block is committed atomically, so an interrupted job continues
from its last committed block with a byte-identical result.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import psutil
import torch

from . import __version__
from .activations import Activations, make_store
from .calibration import calibration_windows
from .errors import StreamPruneError
from .io import BlockIO
from .loop import BlockLoop, Stopped
from .memory import MemoryMonitor
from .model import StreamedModel
from .plan import block_shape, itemsize, make_plan
from .resume import block_inputs, save_snapshot
from .runtime import Fault, Observer, ProcessEnv, Runtime
from .shards import INDEX_NAME, Checkpoint
from .spec import PruneOptions, PruneSpec
from .state import BlockRecord, JobDir, open_job, verify_committed
from .units import human_bytes
from .writer import copy_side_files, shard_name, write_index, write_shard


BACKGROUND_PHASES = ("read_block", "write")  # on the I/O thread, overlapping other blocks' main-thread phases


def prune(model, out, *, observer: Observer | None = None, log=None, **options) -> dict:
    """Prune the checkpoint in `model` into `out` (options: see spec.PruneOptions); returns the summary."""
    env = ProcessEnv.read()
    spec = PruneSpec.resolve(model, out, PruneOptions.from_dict(options), env.local_rank)
    obs = observer or Observer(log=log, progress=spec.options.progress, fault=Fault.from_env(env))
    with Runtime(spec.device, env, spec.gpu_limit) as rt:
        if not rt.dist.main:
            obs.quiet()
        return PruneJob(spec, rt, obs).run()


class PruneJob:
    def __init__(self, spec: PruneSpec, rt: Runtime, obs: Observer):
        self.spec, self.rt, self.obs = spec, rt, obs
        self.t0 = time.perf_counter()
        o = spec.options
        self.ckpt = Checkpoint(spec.model.path)
        self.model = StreamedModel(spec.model.config, self.ckpt, spec.device, spec.dtype, o.attn_implementation)
        self.model.check(spec.structure)
        self.n_blocks = len(self.model.blocks)
        self.jobdir = JobDir(spec.out, rt.dist.rank, rt.dist.world)
        batches = [(j, min(o.nsamples, j + o.batch_size)) for j in range(0, o.nsamples, o.batch_size)]
        self.batches = rt.dist.share(batches)  # this rank's contiguous share, in calibration order
        if rt.dist.enabled and not self.batches:
            raise StreamPruneError(f"{rt.dist.world} ranks but only {len(batches)} calibration batches; "
                                   f"use fewer ranks or more --nsamples")
        self.windows = self._calibration() if spec.needs_data else None
        self.loop = None
        self.state = None

    # ------------------------------------------------------------------ the job, top to bottom

    def run(self) -> dict:
        spec = self.spec
        with MemoryMonitor(device=spec.device) as mon:
            self.state, resumed = self.rt.dist.agree(self._open)
            if self.state.complete and (spec.out / INDEX_NAME).is_file():
                self.obs.log(f"{spec.out}: job already complete; nothing to do")
                return self._summary(mon, resumed=True)
            plan = self._plan()
            self.rt.dist.agree(lambda: self._check_disk(plan))
            self.loop = BlockLoop(spec.pruner, spec.structure, self.rt, self.obs, spec.device, plan.row_chunk)
            try:
                start = self._verify(resumed)
                with BlockIO(self.model.read_block, spec.options.overlap, self.obs.phase) as io:
                    self._write_outside(io)
                    sparsities = self._block_sparsities(plan)
                    acts = self._activations(plan, start)
                    try:
                        self._prune_blocks(io, start, acts, sparsities)
                    finally:
                        if acts is not None:
                            acts.close()
                if self.rt.dist.main:
                    self._publish()
                self.rt.dist.barrier()
            except torch.cuda.OutOfMemoryError:
                raise StreamPruneError("CUDA out of memory: lower --batch-size, --seqlen or --nsamples, or keep "
                                       "activations off the GPU with --activations cpu (or disk)") from None
            except OSError as e:
                if e.errno == 28:
                    raise StreamPruneError(f"no space left on device while writing to {spec.out}; free space and run "
                                           f"`streamprune resume {spec.out}` to continue") from None
                raise
        return self._summary(mon, resumed=resumed, plan=plan)

    def _prune_blocks(self, io: BlockIO, start: int, acts, sparsities: list[float]) -> None:
        """The block loop: read (ahead), prune, write and commit (behind); stop at a safe point on a signal."""
        model, n = self.model, self.n_blocks
        bar = self.obs.bar(total=n, initial=start, desc="blocks", unit="block")
        for i in range(start, n):
            if self.rt.stop_requested():
                break
            self.obs.event("block_start")
            t_block, before = time.perf_counter(), dict(self.obs.seconds)
            with self.obs.phase("read"):
                block, kept = model.load_block(i, io.read(i, ahead=i + 1 if i + 1 < n else None))
            want = {name[len(model.block_prefix(i)):] for name in kept}
            try:
                result = self.loop.prune_block(i, block, acts, sparsities[i], want)
            except Stopped:
                model.release_block(i)
                break
            tensors = model.block_tensors(i, block, kept, result.masks, result.recomputed) if self.rt.dist.main else None
            del kept, result.masks
            model.release_block(i)
            snapshot = self._maybe_snapshot(i, acts)
            phases = {k: round(v - before.get(k, 0.0), 4) for k, v in self.obs.seconds.items()
                      if v - before.get(k, 0.0) > 0 and k not in BACKGROUND_PHASES}
            record = BlockRecord(shard_name(i + 1, n + 1), result.sparsity, result.target, result.linears,
                                 time.perf_counter() - t_block, phases)
            io.write(self._shard_writer(record.file, tensors),
                     lambda meta, seconds, i=i, record=record, snapshot=snapshot: self._commit(meta, seconds, i, record,
                                                                                             snapshot))
            del tensors
            if acts is not None:
                acts.swap()
            bar.update(1)
            bar.set_postfix(sparsity=f"{result.sparsity:.3f}")
        bar.close()
        io.flush()
        if self.rt.stop_requested():  # unconditionally: a collective on every rank
            self._save_inputs_on_stop(acts)
            raise self.rt.interrupted(f"stopped with {self.state.committed} of {n} blocks committed", self.spec.out)

    def _shard_writer(self, name: str, tensors: dict | None):
        """The write of one shard (nothing on ranks other than 0, which do not write)."""
        if tensors is None:
            return lambda: None
        return lambda: write_shard(self.spec.out / name, tensors, self.obs.event)

    # ------------------------------------------------------------------ phases

    def _calibration(self) -> torch.Tensor:
        o = self.spec.options
        return calibration_windows(o.calib, self.spec.model.path, o.nsamples, o.seqlen, o.seed,
                                   self.spec.model.text.vocab_size)

    def _fingerprint(self) -> dict:
        import transformers

        spec, o = self.spec, self.spec.options
        options = {k: getattr(o, k) for k in PruneOptions.RESULT_KEYS}
        options.update(dtype=str(spec.dtype).replace("torch.", ""), structure=str(spec.structure),
                       device_type=spec.device.type, ranks=self.rt.dist.world)
        fp = {"checkpoint": self.ckpt.fingerprint(),
              "config_sha256": hashlib.sha256((spec.model.path / "config.json").read_bytes()).hexdigest(),
              "options": options,
              "versions": {"streamprune": __version__, "torch": torch.__version__,
                           "transformers": transformers.__version__}}
        if self.windows is not None:
            fp["calibration_sha256"] = hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()
        return fp

    def _open(self):
        o = self.spec.options
        options = {k: v for k, v in o.as_dict().items() if k not in ("overwrite", "restart", "progress")}
        options["model"] = str(self.spec.model.path.resolve())
        options["calib"] = str(Path(o.calib).resolve()) if o.calib else None
        return open_job(self.jobdir, self._fingerprint(), options, self.n_blocks, restart=o.restart,
                        overwrite=o.overwrite)

    def _plan(self):
        spec, o = self.spec, self.spec.options
        gpu_free = None
        if spec.device.type == "cuda":
            gpu_free = torch.cuda.mem_get_info(spec.device)[0]
            if spec.gpu_limit:
                gpu_free = min(gpu_free, spec.gpu_limit)
        return make_plan(block_shape(self.model.blocks, spec.model.config), nsamples=o.nsamples, seqlen=o.seqlen,
                         batch=o.batch_size, ckpt_itemsize=itemsize(spec.checkpoint_dtype),
                         compute_itemsize=itemsize(spec.dtype), device_type=spec.device.type, tier=o.activations,
                         gpu_free=gpu_free, host_free=psutil.virtual_memory().available,
                         checkpoint_bytes=sum(t.nbytes for t in self.ckpt.tensors.values()),
                         needs_activations=spec.needs_data, snapshot=o.snapshot_every > 0)

    def _check_disk(self, plan) -> None:
        written = sum(m["size"] for m in self.state.files.values())
        remaining = max(0, plan.disk_bytes - written)
        need = remaining + max(1024 ** 2, remaining // 50)  # margin: 2%, at least 1 MiB
        free = shutil.disk_usage(self.spec.out).free
        if need > free:
            raise StreamPruneError(f"not enough disk space in {self.spec.out}: the job needs {human_bytes(need)} "
                                   f"(pruned shards plus activation cache plus margin), {human_bytes(free)} is free")

    def _verify(self, resumed: bool) -> int:
        if not resumed:
            return 0
        first = shard_name(0, self.n_blocks + 1)
        start, self.state = self.rt.dist.agree(
            lambda: (verify_committed(self.jobdir, self.state, first, self.obs.log), self.state))
        self.obs.log(f"resume: {start} of {self.n_blocks} blocks already committed")
        return start

    def _write_outside(self, io: BlockIO) -> None:
        """The shard of everything outside the blocks (embeddings, final norm, head), copied as it is."""
        name = shard_name(0, self.n_blocks + 1)
        if name in self.state.files or not self.rt.dist.main:
            return
        tensors = {n: self.ckpt.read(n) for n in self.model.other_names()}

        def then(meta, seconds):
            self.state.files[name] = meta
            self.jobdir.save(self.state, self.obs.event)
        io.write(self._shard_writer(name, tensors), then)

    def _block_sparsities(self, plan) -> list[float]:
        """Each block's target: uniform, or from a sweeping profile (OWL), whose result is kept in the state."""
        spec = self.spec
        if not spec.profile.sweeps:
            return [spec.options.sparsity] * self.n_blocks
        if self.state.profile is None:
            t = time.perf_counter()
            acts = self._new_activations(plan)
            try:
                block_inputs_fresh = self.capture(acts.batches, only_kwargs=False)
                acts.kwargs = block_inputs_fresh.kwargs
                for (j0, j1), h in zip(acts.batches, block_inputs_fresh.inputs):
                    acts.inputs.write(acts.local(j0, j1)[0], h)
                del block_inputs_fresh
                scores = []
                for i in self.obs.bar(range(self.n_blocks), desc=f"{spec.profile.name} sweep", unit="block"):
                    block, _ = self.model.load_block(i)
                    stats = self.loop.statistics(block, i, acts, spec.profile.needs, spec.profile.name, outputs=True)
                    scores.append(spec.profile.score([(m.weight, stats.stats[n]) for n, m in stats.linears.items()],
                                                     self.loop.row_chunk))
                    del stats
                    self.model.release_block(i)
                    acts.swap()
            except Stopped:
                raise self.rt.interrupted(f"stopped during the {spec.profile.name} sweep (it restarts on resume)",
                                          spec.out) from None
            finally:
                acts.close()
            self.state.profile = {"name": spec.profile.name, "scores": scores,
                                  "sparsities": spec.profile.allocate(scores, spec.options.sparsity)}
            self.obs.add(f"{spec.profile.name}_sweep", time.perf_counter() - t)
            if self.rt.dist.main:
                self.jobdir.save(self.state, self.obs.event)
        sparsities = self.state.profile["sparsities"]
        self.obs.log(f"{spec.profile.name}: per-block sparsity " + " ".join(f"{x:.3f}" for x in sparsities))
        return sparsities

    def _new_activations(self, plan) -> Activations:
        o, spec = self.spec.options, self.spec
        hidden = spec.model.text.hidden_size
        return Activations(lambda tag, n: make_store(plan.tier, n, o.seqlen, hidden, spec.dtype, spec.device,
                                                     self.jobdir.cache_path(tag)), self.batches)

    def capture(self, batches, only_kwargs: bool):
        """Block-0 inputs (and every block's call arguments) from the model's own forward."""
        with self.obs.phase("capture", self.spec.device):
            windows = [self.windows[j0:j1] for j0, j1 in batches]
            if only_kwargs:
                windows = list({w.shape[0]: w for w in windows}.values())
            return self.model.capture(windows)

    def _activations(self, plan, start: int):
        self.tier = plan.tier
        if not self.spec.needs_data or start >= self.n_blocks:
            return None
        acts = self._new_activations(plan)
        try:
            block_inputs(self, start, acts)
        except Stopped:
            acts.close()
            raise self.rt.interrupted("stopped before any new block", self.spec.out) from None
        except BaseException:
            acts.close()
            raise
        return acts

    def _commit(self, meta: dict | None, write_seconds: float, i: int, record: BlockRecord, snapshot) -> None:
        """Record block i once its shard is on disk (rank 0 saves; the other ranks keep count). Runs on the I/O
        thread; the main thread reads the state only after `io.flush()`."""
        record.phase_seconds["write"] = round(write_seconds, 4)
        self.state.commit(i, record, meta)
        if snapshot is not None:
            self.state.snapshot = snapshot
        if self.rt.dist.main:
            self.jobdir.save(self.state, self.obs.event)
            if snapshot is not None:
                self.jobdir.drop_snapshots(before=snapshot.after_block)

    def _maybe_snapshot(self, i: int, acts):
        """Every `snapshot_every` blocks (not after the last) save the next block's inputs."""
        k = self.spec.options.snapshot_every
        if acts is None or i == self.n_blocks - 1 or not (k and (i + 1) % k == 0):
            return None
        return save_snapshot(self, i, acts.outputs, acts)

    def _save_inputs_on_stop(self, acts) -> None:
        """On a signal, keep the next block's inputs so the resume needs no recomputation."""
        done, snap = self.state.committed, self.state.snapshot
        if acts is None or done == 0 or done == self.n_blocks or (snap and snap.after_block == done - 1):
            return
        self.state.snapshot = save_snapshot(self, done - 1, acts.inputs, acts)
        if self.rt.dist.main:
            self.jobdir.save(self.state, self.obs.event)
            self.jobdir.drop_snapshots(before=done - 1)

    def _publish(self) -> None:
        spec, model = self.spec, self.model
        copy_side_files(spec.model.path, spec.out, self.obs.event)
        weight_map = {n: shard_name(0, self.n_blocks + 1) for n in model.other_names()}
        for i in range(self.n_blocks):
            weight_map.update({n: shard_name(i + 1, self.n_blocks + 1) for n in model.block_names(i)})
        total = sum(self.ckpt.tensors[n].nbytes for n in weight_map)
        self.obs.event("publish")
        write_index(spec.out, weight_map, total, self.obs.event)
        self.state.snapshot = None
        self.state.complete = True
        self.jobdir.save(self.state, self.obs.event)
        self.jobdir.drop_snapshots()
        for leftover in self.jobdir.dir.glob("*.bin"):
            leftover.unlink()

    def _summary(self, mon: MemoryMonitor, resumed: bool, plan=None) -> dict:
        spec, state = self.spec, self.state
        sp = {i: b.sparsity for i, b in state.blocks.items()}
        worst = min(sp, key=sp.get) if sp else None
        out = {
            "model": str(spec.model.path), "out": str(spec.out), "method": spec.options.method,
            "structure": str(spec.structure), "target_sparsity": spec.options.sparsity,
            "blocks": self.n_blocks, "blocks_committed": state.committed, "resumed": resumed,
            "sparsity": state.sparsity(),
            "worst_block": {"index": worst, "sparsity": sp[worst]} if worst is not None else None,
            "wall_seconds": time.perf_counter() - self.t0, "device": str(spec.device),
            "compute_dtype": str(spec.dtype).replace("torch.", ""), "activations": getattr(self, "tier", None),
            "nsamples": spec.options.nsamples, "seqlen": spec.options.seqlen,
            "ranks": self.rt.dist.world, "rank": self.rt.dist.rank,
            "phase_seconds": {k: round(v, 4) for k, v in sorted(self.obs.seconds.items())},
            "block_sparsity": [sp[k] for k in sorted(sp)],
            "block_seconds": [state.blocks[k].phase_seconds for k in sorted(sp)],
        }
        out.update(mon.report())
        if plan is not None:
            out["plan"] = plan.as_dict()
        return out

