"""The prune job: the units composed in the order data flows through them.

shards -> block -> activations -> statistics -> mask -> writer -> job state: `PruneJob.run` reads top to bottom
as that flow. Only one decoder block's weights are in memory at a time (plus one more being read or written,
see io.py); every block is committed atomically, so an interrupted job continues from its last committed
block with a byte-identical result.
"""

from __future__ import annotations

import errno
import hashlib
import json
import time
from contextlib import nullcontext

import torch

from .activations import Activations, make_store
from .calibration import calibration_windows
from .errors import StreamPruneError
from .io import BlockIO
from .loop import BlockLoop, Stopped
from .memory import MemoryMonitor
from .groups import ExpertSource, check_blocks
from .model import StreamedModel, experts_problem
from .targets import expert_parameters, experts_modules
from .planner import check_disk, itemsize, plan_job
from .resume import block_inputs, keep_inputs_on_stop, snapshot_after, verify_inputs
from .runtime import Fault, Observer, ProcessEnv, Runtime
from .shards import INDEX_NAME, Checkpoint
from .spec import PruneOptions, PruneSpec, check_ranks, slow_on_cpu
from .state import BlockRecord, JobDir, fingerprint, stored_options
from .width import check_model, llama_cpp_warning, shrink_config, width_facts
from .writer import copy_side_files, shard_name, write_atomic, write_index, write_shard

BACKGROUND_PHASES = ("read_block", "write")  # on the I/O thread, overlapping other blocks' main-thread phases


def prune(model, out, *, observer: Observer | None = None, log=None, **options) -> dict:
    """Prune the checkpoint in `model` into `out` (options: see spec.PruneOptions); returns the summary."""
    env = ProcessEnv.read()
    spec = PruneSpec.resolve(model, out, PruneOptions.from_dict(options), env.local_rank)
    obs = observer or Observer(log=log, progress=spec.options.progress, fault=Fault.from_env(env))
    with Runtime(spec.device, env, spec.gpu_limit) as rt:
        if not rt.dist.main:
            obs.quiet()
        slow = slow_on_cpu(spec.device, spec.dtype)
        if slow:
            obs.log(slow)
        return PruneJob(spec, rt, obs).run()


def preflight(model, out, ranks: int, **options) -> None:
    """What every rank of a `--nproc` job checks, checked once before any rank starts, writing nothing: options,
    paths, the model's files and config, the calibration data and the ranks' shares of it, the plan's groups."""
    from types import SimpleNamespace

    from .distributed import Dist
    from .spec import resolve_device

    spec = PruneSpec.resolve(model, out, PruneOptions.from_dict(options))
    if spec.device.type == "cuda":
        resolve_device(spec.options.device, ranks - 1)  # every rank its own GPU
    job = PruneJob(spec, SimpleNamespace(dist=Dist(0, ranks)), Observer(progress=False))
    job.plan = plan_job(spec, job.model.blocks, job.ckpt)
    if job.plan.expert_group:
        job._check_groups()


class PruneJob:
    def __init__(self, spec: PruneSpec, rt: Runtime, obs: Observer):
        self.spec, self.rt, self.obs = spec, rt, obs
        self.t0 = time.perf_counter()
        o = spec.options
        self.ckpt = Checkpoint(spec.model.path)
        self.model = StreamedModel(spec.model.config, self.ckpt, spec.device, spec.dtype, o.attn_implementation)
        self.model.check(spec.structure)
        if spec.structure.width:
            check_model(self.model.blocks, self.model.config)  # the width strategy's own shape checks
        self.model.fp8_reencode = o.method if spec.pruner.updates_weights else None
        problem = experts_problem(self.model.blocks, self.model.config.model_type)
        if problem:  # before anything is written: OUT untouched
            raise StreamPruneError(f"cannot prune {spec.model.path}: {problem}")
        self.n_blocks = len(self.model.blocks)
        groups = self.model.copy_groups()
        total = len(groups) + self.n_blocks  # the copied shards first, then one shard per block
        self.copies = {shard_name(k, total): g for k, g in enumerate(groups)}
        self.block_files = [shard_name(len(groups) + i, total) for i in range(self.n_blocks)]
        self.jobdir = JobDir(spec.out, rt.dist.rank, rt.dist.world)
        batches = [(j, min(o.nsamples, j + o.batch_size)) for j in range(0, o.nsamples, o.batch_size)]
        check_ranks(rt.dist.world, o.nsamples, o.batch_size)
        self.batches = rt.dist.share(batches)  # this rank's contiguous share, in calibration order
        self.windows = calibration_windows(o.calib, spec.model.path, o.nsamples, o.seqlen, o.seed,
                                           spec.model.text.vocab_size, o.calib_dataset,
                                           o.calib_column) if spec.needs_data else None
        self.state = self.plan = self.loop = None

    def run(self) -> dict:
        spec, rt = self.spec, self.rt
        self.plan = plan_job(spec, self.model.blocks, self.ckpt)
        if spec.structure.width and (warning := llama_cpp_warning(spec.pruner.keep)):
            self.obs.log(f"warning: {warning}")
        if self.plan.expert_group:
            self._check_groups()  # before OUT is touched
        with MemoryMonitor(device=spec.device) as mon, (self.jobdir.locked() if rt.dist.main else nullcontext()):
            self.obs.event("locked")  # OUT is this job's; its state may not exist yet
            # grouped, a pruner that updates weights propagates its experts through their weights as written in a
            # narrower checkpoint dtype (groups.py): another output than whole blocks give
            as_written = bool(self.plan.expert_group and spec.pruner.updates_weights and
                              itemsize(spec.checkpoint_dtype) < itemsize(spec.dtype))
            fp = fingerprint(spec, self.ckpt, self.windows, rt.dist.world, experts_as_written=as_written)
            self.state, resumed = rt.dist.agree(lambda: self.jobdir.open(
                fp, stored_options(spec), self.n_blocks, restart=spec.options.restart,
                overwrite=spec.options.overwrite, inputs=self.ckpt.identity(), event=self.obs.event))
            if self.state.complete and rt.dist.agree(self._intact):
                self.obs.log(f"{spec.out}: job already complete; nothing to do")
                return dict(summary(self, mon, resumed=True), already_complete=True)
            rt.dist.agree(lambda: check_disk(self.plan, spec.out, sum(m["size"] for m in self.state.files.values())))
            self.loop = BlockLoop(spec.pruner, spec.structure, rt, self.obs, spec.device, spec.dtype, self.plan.row_chunk,
                                  spec.options.expert_min_tokens, spec.profile)
            if not spec.needs_data:
                self.loop.probe = self._probe
            try:
                start = self._verify() if resumed else 0
                with BlockIO(self.model.read_block, spec.options.overlap and self.plan.overlap, self.obs.phase) as io:
                    self._write_copies(io)
                    sparsities = self._block_sparsities(io)
                    acts = self._activations(start)
                    try:
                        self._prune_blocks(io, start, acts, sparsities)
                    finally:
                        if acts is not None:
                            acts.close()
                if rt.dist.main:
                    self._publish()
                rt.dist.barrier()
            except torch.cuda.OutOfMemoryError:
                raise StreamPruneError("CUDA out of memory: lower --batch-size, --seqlen or --nsamples, or keep "
                                       "activations off the GPU with --activations cpu (or disk)") from None
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise StreamPruneError(f"no space left on device while writing to {spec.out}; free space and run "
                                           f"`streamprune resume {spec.out}` to continue") from None
                if e.errno == errno.EFBIG:  # a file-size limit (ulimit -f; Python ignores SIGXFSZ, so the write fails)
                    raise StreamPruneError(f"file too large for this process's file-size limit (ulimit -f) while "
                                           f"writing to {spec.out}; raise the limit and run `streamprune resume "
                                           f"{spec.out}` to continue") from None
                raise
        return summary(self, mon, resumed=resumed)

    def _prune_blocks(self, io: BlockIO, start: int, acts, sparsities: list[float]) -> None:
        """The block loop: read (ahead), prune, write and commit (behind); stop at a safe point on a signal."""
        model, n = self.model, self.n_blocks
        bar = self.obs.bar(total=n, initial=start, desc="blocks", unit="block")
        for i in range(start, n):
            if self.rt.stop_requested():
                break
            self.obs.event("block_start")
            t_block, before = time.perf_counter(), dict(self.obs.seconds)
            source = self._expert_source(i)
            grouped = frozenset() if source is None else frozenset(source.local(a) for a in source.params)
            with self.obs.phase("read"):
                host, input_sha256 = io.read(i, ahead=i + 1 if i + 1 < n else None)
                block, kept = model.load_block(i, host, grouped)
                del host
            want = model.kept_params(i, kept) - grouped
            if source is not None:
                source.kept = kept
            try:
                result = self.loop.prune_block(i, block, acts, sparsities[i], want, source)
            except Stopped:
                model.release_block(i)
                break
            del source
            tensors = model.block_tensors(i, block, kept, result.masks, result.recomputed, grouped) \
                if self.rt.dist.main else None
            if not self.spec.structure.width:  # width's figures are the fractions removed (no zeros written)
                count_written(result, self.rt.dist.agree(lambda: model.written_zeros(i, tensors)))
            del kept, result.masks
            model.release_block(i)
            snapshot = snapshot_after(i, acts, self.spec.options.snapshot_every, n, self.jobdir, self.rt.dist,
                                      self.obs)
            phases = {k: round(v - before.get(k, 0.0), 4) for k, v in self.obs.seconds.items()
                      if v - before.get(k, 0.0) > 0 and k not in BACKGROUND_PHASES}
            record = BlockRecord(self.block_files[i], result.sparsity, result.target, result.linears,
                                 time.perf_counter() - t_block, phases, input_sha256, result.experts, result.fallback)
            io.write(self._shard_writer(record.file, tensors),
                     lambda meta, seconds, i=i, r=record, s=snapshot: self._commit(meta, seconds, i, r, s))
            del tensors
            if acts is not None:
                acts.swap()
            bar.set_postfix(sparsity=f"{result.sparsity:.3f}")  # first: a log line per update shows this block's
            bar.update(1)
        bar.close()
        io.flush()
        if self.rt.stop_requested():  # unconditionally: a collective on every rank
            keep_inputs_on_stop(acts, self.state, n, self.jobdir, self.rt.dist, self.obs)
            raise self.rt.interrupted(f"stopped with {self.state.committed} of {n} blocks committed", self.spec.out)

    # ------------------------------------------------------------------ the steps

    def _check_groups(self) -> None:
        """What streaming experts in groups does not do (yet), refused before anything is written."""
        spec = self.spec
        if spec.profile.sweeps or spec.profile.within_needs:
            why = f"with --sparsity-profile {spec.profile.name}"
        else:
            why = check_blocks(self.model.blocks, spec.model.text.hidden_size, spec.dtype)
        if why:
            raise StreamPruneError(f"experts streamed in groups ({self.plan.expert_group} at a time, "
                                   + ("--expert-group" if spec.options.expert_group else "the plan: a whole block "
                                      "does not fit") + f") are not supported {why}")

    def _expert_source(self, i: int) -> ExpertSource | None:
        """Block i's experts streamed in groups when the plan (or --expert-group) says so, else None."""
        size = self.plan.expert_group
        found = experts_modules(self.model.blocks[i])
        if not size or not found:
            return None
        (name, module), = found.items()  # one experts module per block: checked by check_groups
        store = torch.device(self.spec.device) if self.plan.tier == "gpu" else torch.device("cpu")
        return ExpertSource(self.model, i, {}, name, expert_parameters(module), size, store)

    def _intact(self) -> bool:
        """A complete job is done only if its index and every recorded file are still there as written. If not,
        the index goes first (an OUT with an index is complete), and the job continues like a resume."""
        bad = self.jobdir.problems(self.state)
        if not bad:
            return True
        self.obs.log(f"{self.spec.out}: the job was complete, but " + (f"{bad[0]} is missing or altered" if
                     bad[0] != INDEX_NAME else "its index is missing") + "; redoing what is needed")
        (self.spec.out / INDEX_NAME).unlink(missing_ok=True)
        self.state.complete = False
        self.jobdir.save(self.state)
        return False

    def _verify(self) -> int:
        """Resume: the same input weights as before (resume.verify_inputs), and the committed files intact."""
        def check():
            verify_inputs(self.state, self.ckpt, self.model, self.copies, self.obs.log)
            return self.jobdir.verify(self.state, list(self.copies), self.obs.log), self.state
        start, self.state = self.rt.dist.agree(check)
        self.obs.log(f"resume: {start} of {self.n_blocks} blocks already committed")
        return start

    def _shard_writer(self, name: str, tensors: dict | None):
        """The write of one shard (nothing on ranks other than 0, which do not write)."""
        if tensors is None:
            return lambda: None
        return lambda: write_shard(self.spec.out / name, tensors, self.obs.event)

    def _write_copies(self, io: BlockIO) -> None:
        """The shards of everything outside the blocks (embeddings, final norm, head, extra layers), copied as
        they are, read and written on the I/O thread one shard at a time."""
        if not self.rt.dist.main:
            return
        for name, group in self.copies.items():
            if name not in self.state.files:
                io.write(lambda name=name, group=group: self._copy(name, group),
                         lambda meta, seconds, name=name: self._commit_file(name, meta))

    def _copy(self, name: str, group: list[str]) -> dict:
        digest = hashlib.sha256()
        tensors = {t: self.ckpt.read(t, digest=digest) for t in group}
        return dict(write_shard(self.spec.out / name, tensors, self.obs.event), input_sha256=digest.hexdigest())

    def _commit_file(self, name: str, meta: dict) -> None:
        self.state.files[name] = meta
        self.jobdir.save(self.state, self.obs.event)

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

    def _block_sparsities(self, io: BlockIO) -> list[float]:
        """Each block's target: uniform, or from a sweeping profile (OWL), whose result is kept in the state
        (recorded and saved on the I/O thread, after the copies' commits queued there: one writer)."""
        profile, target = self.spec.profile, self.spec.options.sparsity
        if not profile.sweeps:
            return [target] * self.n_blocks
        result = self.state.profile
        if result is None:
            t = time.perf_counter()
            acts = self._new_activations()
            try:
                self._block_inputs(0, acts)
                scores = self.loop.sweep(self.model, acts, profile)
            except Stopped:
                raise self.rt.interrupted(f"stopped during the {profile.name} sweep (it restarts on resume)",
                                          self.spec.out) from None
            finally:
                acts.close()
            result = {"name": profile.name, "scores": scores, "sparsities": profile.allocate(scores, target)}
            self.obs.add(f"{profile.name}_sweep", time.perf_counter() - t)
            io.then(lambda: self._commit_profile(result))
        sparsities = result["sparsities"]
        self.obs.log(f"{profile.name}: per-block sparsity " + " ".join(f"{x:.3f}" for x in sparsities))
        return sparsities

    def _commit_profile(self, result: dict) -> None:
        self.state.profile = result
        if self.rt.dist.main:
            self.jobdir.save(self.state, self.obs.event)

    def _new_activations(self) -> Activations:
        spec, o = self.spec, self.spec.options
        hidden = spec.model.text.hidden_size
        return Activations(lambda tag, n: make_store(self.plan.tier, n, o.seqlen, hidden, spec.dtype, spec.device,
                                                     self.jobdir.cache_path(tag)), self.batches)

    def _activations(self, start: int) -> Activations | None:
        """The inputs of block `start` (resume.py decides how), or None when no block needs data."""
        if not self.spec.needs_data or start >= self.n_blocks:
            return None
        acts = self._new_activations()
        try:
            self._block_inputs(start, acts)
        except BaseException as e:
            acts.close()
            if isinstance(e, Stopped):
                raise self.rt.interrupted("stopped before any new block", self.spec.out) from None
            raise
        return acts

    def _probe(self):
        """(block-0 input, every block's call kwargs) of one 16-token probe window: the forward by which a method
        without calibration data finds a Mixture-of-Experts block's routers (loop.BlockLoop.find_routers)."""
        if getattr(self, "_probed", None) is None:
            ids = (torch.arange(min(16, self.spec.options.seqlen)) % self.spec.model.text.vocab_size).unsqueeze(0)
            with self.obs.phase("capture", self.spec.device):
                captured = self.model.capture([ids])
            self._probed = (captured.inputs[0], captured.kwargs[1])
        return self._probed

    def _block_inputs(self, start: int, acts) -> None:
        """Block `start`'s inputs into `acts`: resume.block_inputs decides between a snapshot and a replay."""
        block_inputs(start, acts, self.state, self.jobdir, self.rt.dist, self._capture, self._replay, self.obs.log)

    def _replay(self, first: int, stop: int, acts) -> None:
        """The forward through committed blocks first..stop-1 as written in OUT (a resume's inputs)."""
        done = Checkpoint(self.spec.out, [self.state.blocks[i].file for i in range(first, stop)])
        for i in range(first, stop):
            block, _ = self.model.load_block(i, {name: done.read(name) for name in self.model.block_names(i)})
            self.loop.forward_all(block, i, acts, "recompute")
            self.model.release_block(i)
            acts.swap()

    def _capture(self, batches, only_kwargs: bool):
        """Block-0 inputs (and every block's call arguments) from the model's own forward."""
        with self.obs.phase("capture", self.spec.device):
            windows = [self.windows[j0:j1] for j0, j1 in batches]
            if only_kwargs:
                windows = list({w.shape[0]: w for w in windows}.values())
            return self.model.capture(windows)

    def _publish(self) -> None:
        """Side files, then the index (last: an OUT with an index is complete), then the state says complete."""
        spec, model, n = self.spec, self.model, self.n_blocks
        copy_side_files(spec.model.path, spec.out, self.obs.event)
        if spec.structure.width:  # the stock architecture with fewer MLP channels
            write_atomic(spec.out / "config.json", shrink_config(spec.model.path / "config.json",
                                                                 spec.pruner.intermediate, spec.pruner.keep))
        weight_map = {tensor: name for name, group in self.copies.items() for tensor in group}
        for i in range(n):
            weight_map.update({tensor: self.block_files[i] for tensor in model.block_names(i)})
        self.obs.event("publish")
        written = Checkpoint(spec.out, shard_names=sorted(set(weight_map.values())))  # headers only
        write_index(spec.out, weight_map, sum(t.nbytes for t in written.tensors.values()), self.obs.event)
        self.state.snapshot = None
        self.state.complete = True
        self.jobdir.save(self.state, self.obs.event)
        for leftover in self.jobdir.dir.glob("*.bin"):
            leftover.unlink()


def count_written(result, zeros: dict) -> None:
    """A block's counts as written: `zeros` (per target label) is what is on disk, `masked` what the method's
    masks zeroed (the requested sparsity); more zeros on disk come from the data (an input channel no calibration
    token reaches, whose column SparseGPT and ADMM zero; zeros already in the input weights)."""
    for label, z in zeros.items():
        counts = result.linears[label]
        counts["masked"], counts["zeros"] = counts["zeros"], z


def summary(job: PruneJob, mon: MemoryMonitor, resumed: bool) -> dict:
    spec, state = job.spec, job.state
    sp = {i: b.sparsity for i, b in state.blocks.items()}
    worst = min(sp, key=sp.get) if sp else None
    out = {
        "model": str(spec.model.path), "out": str(spec.out), "method": spec.options.method,
        "structure": str(spec.structure), "target_sparsity": spec.options.sparsity,
        "blocks": job.n_blocks, "blocks_committed": state.committed, "resumed": resumed,
        "sparsity": state.sparsity(),      # the zeros written, over the pruned weights
        "mask_sparsity": state.mask_sparsity(),  # the zeros the methods' masks chose: the rest came from the data
        "worst_block": {"index": worst, "sparsity": sp[worst]} if worst is not None else None,
        "wall_seconds": time.perf_counter() - job.t0, "device": str(spec.device),
        "compute_dtype": str(spec.dtype).replace("torch.", ""),
        "activations": job.plan.tier if job.plan else None, "nsamples": spec.options.nsamples,
        "seqlen": spec.options.seqlen, "ranks": job.rt.dist.world, "rank": job.rt.dist.rank,
        "phase_seconds": {k: round(v, 4) for k, v in sorted(job.obs.seconds.items())},
        "input_hash_seconds": round(job.ckpt.hash_seconds, 4),  # inside read_block/write, on the I/O thread
        "block_sparsity": [sp[k] for k in sorted(sp)],
        "experts": sum(b.experts for b in state.blocks.values()),
        "experts_fallback": sum(b.fallback for b in state.blocks.values()),  # see BlockLoop.fallback
        "expert_group": job.plan.expert_group if job.plan else 0,  # experts per group when streamed (groups.py)
        "block_seconds": [state.blocks[k].phase_seconds for k in sorted(sp)],
    }
    if spec.structure.width:  # sparsity above: the fraction of the MLP weights removed
        out["intermediate_size"] = width_facts(spec.pruner.intermediate, spec.pruner.keep, spec.options.sparsity,
                                               spec.options.width_multiple)
        index = spec.out / INDEX_NAME
        out["bytes"] = {"before": sum(t.nbytes for t in job.ckpt.tensors.values()),
                        "after": json.loads(index.read_text())["metadata"]["total_size"] if index.is_file() else None}
    out.update(mon.report())
    if job.plan is not None:
        out["plan"] = job.plan.as_dict()
    return out
