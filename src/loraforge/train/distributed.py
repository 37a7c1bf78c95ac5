"""Several processes, one run: torchrun launch, process group, DDP / FSDP2 wrapping, rank-0-only writes.

Data parallelism is PyTorch's own stack (torch.distributed + DDP or FSDP2); nothing here sends data
itself. Every process walks the same global sequence of micro-batches (the batch order is a function of
(seed, epoch)), and the `grad_accum` micro-batches of one optimizer step are dealt round-robin to the ranks
(rank r takes micro-batches r, r+W, r+2W, ...). Every rank runs the same number of forward passes (a rank
short of work repeats one with weight 0), the loss is divided by the GLOBAL number of loss tokens of the
step, and DDP/FSDP2 reduce the gradients once per step. So the optimizer sees the same gradient whatever
the number of processes, the loss curve matches the one-process run, and the data position saved in a
checkpoint is global: a run resumes on any number of processes.

Launch: `loraforge train CONFIG --gpus N` re-runs itself under torchrun (torch.distributed.run's parse_args
and run, quiet where a worker has said why it stopped); torchrun (with a rendezvous for several machines)
works directly too. Backend nccl on CUDA, gloo on CPU. torch is imported inside the functions, so the
launcher answers at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta

from loraforge.errors import LoraforgeError


@dataclass
class DistContext:
    """Where this process stands in the run (world 1 = a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "ddp"  # ddp | fsdp

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch

        if self.enabled:
            torch.distributed.barrier()

    def all_sum(self, values: list[float], device) -> list[float]:
        """Element-wise sum over the ranks (float64, so token counts stay exact)."""
        import torch

        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def on_main(self, fn, *args, **kwargs):
        """Run fn on rank 0 only; every rank gets its result, or raises the LoraforgeError it raised."""
        import torch

        if not self.enabled:
            return fn(*args, **kwargs)
        box: list = [None]
        if self.is_main:
            try:
                box = [("ok", fn(*args, **kwargs))]
            except LoraforgeError as e:
                box = [("error", (str(e), None))]
        torch.distributed.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise LoraforgeError(value[0])
        return value


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpu_count(n: int, device: str) -> None:
    """Refuse, before launching anything, to start more processes than there are GPUs."""
    if n < 1:
        raise LoraforgeError(f"--gpus {n}: ask for at least one process")
    if device == "cpu":
        return  # N CPU processes (gloo): used by tests and for debugging
    have = visible_gpus()
    if n > have:
        raise LoraforgeError(f"--gpus {n} but only {have} GPU{'s' if have != 1 else ''} visible",
                             hint=f"use --gpus {have}" if have else
                             "run on a machine with GPUs, or set train.device=cpu for CPU processes")


def torchrun_command(n: int, args: list[str]) -> list[str]:
    """The command that runs `loraforge ARGS` as n processes on this machine (a private rendezvous port):
    torchrun's own parse_args + run, through torchrun_quietly."""
    return [sys.executable, "-c", "import sys; from loraforge.train.distributed import torchrun_quietly; "
            "sys.exit(torchrun_quietly(sys.argv[1:]))", "--standalone", "--nproc-per-node", str(n),
            "-m", "loraforge", *args]


EXIT_FILE_ENV = "LORAFORGE_EXIT_FILE"   # where a worker's loraforge exit code goes under run_torchrun


def record_exit_code(code: int) -> tuple[int, bool]:
    """Under run_torchrun: leave this worker's exit code (a user error 2, a deliberate stop 3) for the launcher,
    since torchrun itself exits 1 whatever its workers' codes (the first worker to write wins). Returns the
    code this worker should exit with (0 after a deliberate stop: every rank stops at the same step, so that
    torchrun ends quietly; else `code`) and whether this worker wrote first: the one that prints the message
    (the ranks meet the same error, and the user needs it once). Outside run_torchrun: (code, True)."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not path:
        return code, True
    try:
        with open(path, "x") as f:
            f.write(str(code))
        first = True
    except OSError:   # another worker was first, or the launcher's folder is gone
        first = False
    return (0 if code == 3 else code), first


def _worker_reported() -> bool:
    path = os.environ.get(EXIT_FILE_ENV)
    return bool(path) and Path(path).is_file()


def torchrun_quietly(argv: list[str]) -> int:
    """torch.distributed.run's `main` (parse_args, then run) without its failure report when a worker left its
    exit code (record_exit_code: a user error it has printed, or a deliberate stop): torchrun's error line,
    its own traceback and a box per rank would bury that one message. Any other failure (a crash) still gets
    torchrun's report of which rank failed, without the launcher's traceback. Returns the exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # its lines on the failed rank and on stopping the others, once a worker has said why it stopped
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(lambda _: not _worker_reported())
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        if not _worker_reported():
            print(e.format_msg(), file=sys.stderr)
        return 1
    return 0


def _workers(pid: int) -> list[int]:
    """The processes torchrun started (Linux /proc); [] where that cannot be read."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def run_torchrun(n: int, args: list[str]) -> int:
    """Run `loraforge ARGS` as n local processes and wait. torchrun runs in a session of its own, so that
    SIGTERM and Ctrl-C reach only the workers, from here (each checkpoints and stops, then exits 0 under this
    launcher): torchrun itself, signalled, would print its own traceback and exit 1. The exit code is the
    workers' own where one left it (record_exit_code): 3 after a deliberate stop, 2 for a user error."""
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lf-exit-") as tmp:
        exit_file = Path(tmp) / "code"
        proc = subprocess.Popen(torchrun_command(n, args), env={**os.environ, EXIT_FILE_ENV: str(exit_file)},
                                start_new_session=True)

        def forward(sig, _frame):
            for pid in _workers(proc.pid) or [proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

        old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = proc.wait()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if exit_file.is_file():
            return int(exit_file.read_text() or code)
        return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def init_distributed(mode: str, device: str, timeout_s: float) -> DistContext:
    """Join the process group torchrun set up (no-op in a single process)."""
    import torch

    if not launched_by_torchrun():
        return DistContext(mode=mode)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= visible_gpus():
            raise LoraforgeError(f"process {local_rank} of this machine has no GPU ({visible_gpus()} visible)",
                                 hint="start at most one process per GPU (--nproc-per-node / --gpus)")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world=world, local_rank=local_rank, mode=mode)


def check_same(ctx: DistContext, what: str, text: str) -> None:
    """Fail on every rank, with the same message, when the ranks disagree on `text` (config, data)."""
    import torch

    if not ctx.enabled:
        return
    mine = (hashlib.sha256(text.encode()).hexdigest()[:16], socket.gethostname())
    got: list = [None] * ctx.world
    torch.distributed.all_gather_object(got, mine)
    bad = [f"rank {r} on {host}" for r, (h, host) in enumerate(got) if h != got[0][0]]
    if bad:
        raise LoraforgeError(f"the processes of this run disagree on the {what}: {', '.join(bad)} "
                             f"differ{'s' if len(bad) == 1 else ''} from rank 0 on {got[0][1]}",
                             hint="start every node with the same config file, overrides and data files")


def data_fingerprint(items) -> str:
    h = hashlib.sha256()
    for t in items:
        h.update(repr((t.input_ids, t.labels)).encode())
    return h.hexdigest()


@contextlib.contextmanager
def peer_failures(ctx: DistContext, timeout_s: float):
    """Turn a dead or stuck peer (a failed collective) into one clear message on the ranks still alive."""
    import torch

    if not ctx.enabled:
        yield
        return
    try:
        yield
    except (torch.distributed.DistError, RuntimeError) as e:
        text = str(e)
        if isinstance(e, torch.distributed.DistError) or any(
                k in text for k in ("gloo", "NCCL", "Connection", "timed out", "Timeout", "closed")):
            raise LoraforgeError(
                f"rank {ctx.rank}: another process of this run stopped or stopped answering "
                f"(waited at most train.dist_timeout_s={timeout_s:g}s): {text.splitlines()[0][:200]}",
                hint="see the other processes' output for the cause; continue with --resume from the last "
                     "checkpoint") from None
        raise


def decoder_layers(model) -> list:
    """The repeated blocks of a causal LM (PEFT-wrapped or not): the units FSDP2 shards one by one."""
    import torch

    found = [m for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")]
    if not found:
        raise LoraforgeError("train.distributed=fsdp: cannot find this model's decoder layers",
                             hint="use train.distributed=ddp")
    return list(found[0])


def edge_modules(model) -> list:
    """The input embedding and the output head, each an FSDP2 group of its own when they share no weight
    (each then holds only its shard outside its own forward and backward, instead of the whole
    vocabulary x hidden matrix for the whole step in the root group); a tied pair stays in the root group,
    since one parameter cannot belong to two groups."""
    hf = next((m for m in model.modules() if hasattr(m, "get_input_embeddings")
               and hasattr(m, "get_output_embeddings")), None)
    emb = hf.get_input_embeddings() if hf is not None else None
    head = hf.get_output_embeddings() if hf is not None else None
    if emb is None or head is None or head.weight is emb.weight:
        return []
    return [emb, head]


def wrap(step_module: torch.nn.Module, ctx: DistContext, device: str) -> torch.nn.Module:
    """DDP or FSDP2 around the module whose forward computes the loss (nothing in a single process).

    FSDP2 shards every decoder layer, the embedding and the head (each its own group unless tied), then
    the rest (final norm, a tied embedding/head) as the root group; it
    replaces parameters in place, so the optimizer must be built after this call. An NF4 (QLoRA) base is
    sharded too: its packed bytes as frozen parameters (viewed as float32), its quantisation state replicated and put
    back on the gathered weight before each forward (loraforge.model.shard_nf4). The fast Llama path
    (a FastLlama built with sharded=True) is attached to the groups: it runs each layer through them."""
    import torch

    if not ctx.enabled:
        return step_module
    if ctx.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from loraforge.model.shard_nf4 import prepare_nf4_for_fsdp

        mesh = init_device_mesh(device, (ctx.world,))
        nf4 = prepare_nf4_for_fsdp(step_module, torch.device(device, ctx.local_rank) if device == "cuda" else device)
        dtypes = {p.dtype for p in step_module.parameters() if p.is_floating_point()}
        low = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
        # LoRA weights are often fp32 beside a bf16 base: compute in the base's dtype, reduce in fp32. Not
        # over NF4: its packed bytes (held as fp32 numbers) must never be cast, so nothing is
        policy = MixedPrecisionPolicy(param_dtype=low[0], reduce_dtype=torch.float32) \
            if low and len(dtypes) > 1 and not nf4 else MixedPrecisionPolicy()
        for layer in decoder_layers(step_module) + edge_modules(step_module):
            # a frozen group (the embedding, the head) has no gradient to reduce, and the fast path may use
            # it over its shards without FSDP2 ever gathering it: a reduce dtype there would make FSDP2's
            # end-of-backward look for gathered parameters that never existed
            frozen = not any(p.requires_grad for p in layer.parameters())
            fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy() if frozen else policy)
        fully_shard(step_module, mesh=mesh, mp_policy=policy)
        fast = getattr(step_module, "parts", None)
        if getattr(fast, "sharded", False):  # the fast Llama path runs each layer through FSDP2's hooks
            from torch.distributed.fsdp import register_fsdp_forward_method

            fast.attach_fsdp(register_fsdp_forward_method)
        return step_module
    from torch.nn.parallel import DistributedDataParallel

    # buffers (rotary tables) are equal on every rank: no re-broadcast before each forward
    quiet = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel).parameters else {"broadcast_buffers": False}
    return DistributedDataParallel(step_module, device_ids=[ctx.local_rank] if device == "cuda" else None, **quiet)


def grad_sync(wrapped: torch.nn.Module, ctx: DistContext, sync: bool):
    """Context for one micro-batch's forward + backward: reduce gradients only when `sync` (the last one)."""
    if not ctx.enabled or sync:
        if ctx.enabled and ctx.mode == "fsdp":
            wrapped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if ctx.mode == "fsdp":
        wrapped.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return wrapped.no_sync()


def full_value(x) -> float:
    """A float from a tensor that may be a DTensor (FSDP2 grad norms)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


def finish(ctx: DistContext) -> None:
    import torch

    if ctx.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
