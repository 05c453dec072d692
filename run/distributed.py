"""Training on several processes with torchrun: DistributedDataParallel, in the manner of
torchvision's references (init_distributed_mode, only rank 0 writes).

    torchrun --nproc_per_node 4 main.py ...                       one machine, 4 processes
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
             --rdzv_backend c10d --rdzv_endpoint HOST:29500 main.py ...   two machines

nccl on GPUs, gloo on CPU. Every rank draws the same global batches and flips from the same
generator as one process would (same seed, same order of draws), and rank r loads its slice of
each global batch (GlobalBatchSlices). Each rank's loss is weighted by its share of the global
batch, so the averaged gradient is that of the global batch mean: `train_batch_size` stays the
global batch. Tests and push scan the slices of their loaders and combine across ranks.
"""
import os

import torch
import torch.distributed as dist

from run.config import UserError


def init_distributed(device_name='auto'):
    """Start the process group when torchrun started this process (WORLD_SIZE > 1); returns the
    device of this rank (cuda:LOCAL_RANK on GPUs, else cpu), or None for a single process."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return None
    use_cuda = device_name != 'cpu' and torch.cuda.is_available()
    if device_name == 'cuda' and not use_cuda:
        raise UserError('-device cuda: CUDA is not available')
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0'))) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if use_cuda else 'gloo')
    return device


def refuse_torchrun(script):
    """The scripts other than main.py run in one process: under torchrun each rank would redo
    the whole job and write the same files."""
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise UserError('%s runs in one process; start it with python, not torchrun (main.py is the script that '
                        'trains on several processes)' % script)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    """True on the process that writes (rank 0, or the only one)."""
    return rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def close():
    if is_distributed():
        dist.destroy_process_group()


def broadcast_object(value):
    """Rank 0's `value` (any picklable object) on every rank; `value` itself for one process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def slice_bounds(n, part, parts):
    """Rows [start, stop) of part `part` when n rows are split into `parts` consecutive slices
    whose sizes differ by at most one, the larger first."""
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)


class GlobalBatchSlices(torch.utils.data.Sampler):
    """A batch sampler for one rank: the global batches of `batch_size` that a single-process
    loader over `dataset` draws (RandomSampler's order when `shuffle`, its seed drawn from the
    global generator; flips drawn with image_data.draw_flips after each index), as lists of
    keys (index, image flipped, map flipped) of this rank's slice.

    A rank whose slice is empty (a last batch smaller than the world) gets the batch's first
    sample with weight 0, so that every rank takes part in each step."""

    def __init__(self, dataset, batch_size, shuffle, draw, part, parts):
        self.n, self.batch_size, self.shuffle, self.draw = len(dataset), batch_size, shuffle, draw
        self.part, self.parts = part, parts

    def __len__(self):
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = iter(torch.utils.data.RandomSampler(range(self.n))) if self.shuffle else iter(range(self.n))
        batch = []
        for index in order:
            batch.append((index, *self.draw()))
            if len(batch) == self.batch_size:
                yield self.mine(batch)
                batch = []
        if batch:
            yield self.mine(batch)

    def mine(self, batch):
        start, stop = slice_bounds(len(batch), self.part, self.parts)
        return batch[start:stop] if stop > start else batch[:1]

    def rows(self, batch_number):
        """(size of global batch `batch_number`, this rank's rows [start, stop) of it)."""
        size = min(self.batch_size, self.n - batch_number * self.batch_size)
        return (size, *slice_bounds(size, self.part, self.parts))

    def weight(self, batch_number):
        """This rank's share of global batch `batch_number` times the world size (DDP averages
        the ranks' gradients); 0 for the stand-in sample of an empty slice."""
        size, start, stop = self.rows(batch_number)
        return (stop - start) * self.parts / size

    def global_indices(self, batch_number):
        """The dataset indices of this rank's rows of an unshuffled loader's batch (push, tests)."""
        _, start, stop = self.rows(batch_number)
        first = batch_number * self.batch_size
        return list(range(first + start, first + stop))


def all_reduce_sum(value):
    """The sum over ranks of a tensor or number (returned as a tensor); itself for one process."""
    tensor = torch.as_tensor(value, dtype=torch.float64).clone()
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def gather_rows(values, indices, n):
    """Rows held by each rank put in place: `values` (k, ...) are the rows `indices` (k,) of an
    (n, ...) array; returns the whole (n, ...) array on every rank."""
    if not is_distributed():
        out = values.new_zeros((n,) + tuple(values.shape[1:]))
        out[torch.as_tensor(indices, device=values.device)] = values
        return out
    device = values.device
    counts = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor(len(indices), device=device))
    most = int(max(counts))
    padded = values.new_zeros((most,) + tuple(values.shape[1:]))
    padded[:len(indices)] = values
    index = torch.full((most,), -1, dtype=torch.long, device=device)
    index[:len(indices)] = torch.as_tensor(indices, dtype=torch.long, device=device)
    all_values = [torch.empty_like(padded) for _ in counts]
    all_index = [torch.empty_like(index) for _ in counts]
    dist.all_gather(all_values, padded.contiguous())
    dist.all_gather(all_index, index)
    out = values.new_zeros((n,) + tuple(values.shape[1:]))
    for part_values, part_index, count in zip(all_values, all_index, counts):
        out[part_index[:int(count)]] = part_values[:int(count)]
    return out


def all_gather_stack(tensor):
    """(world, ...) stack of every rank's `tensor` (same shape on all ranks)."""
    if not is_distributed():
        return tensor[None]
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)
