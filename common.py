"""
What train.py and distill.py share, written once: one-line errors, DDP setup and teardown, autocast,
the learning-rate schedule, the batch loader that remembers its place, the cache of a frozen
encoder's outputs, the trainable parameters and AdamW, distil-whisper's loss, and the run's
checkpoint and log. Each script's own work stays in the script.
"""
import dataclasses
import gc
import hashlib
import json
import math
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import atomic_save
from model import AudioLLM

def fail(msg):
    """The script's error in one line on stderr, exit status 1."""
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
    sys.exit(1)

def one_line_errors():
    """Bad input (a file, a value) met anywhere in the script: one line, not a traceback."""
    def hook(kind, e, tb):
        if issubclass(kind, (OSError, ValueError)):
            fail(str(e))
        sys.__excepthook__(kind, e, tb)
    sys.excepthook = hook

def init_ddp(device):
    """-> (ddp, rank, local_rank, world_size, device). Under torchrun one process per rank: NCCL
    on CUDA, gloo on CPU; device '' = cuda if available, else cpu."""
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={device!r} but CUDA is not available to torch {torch.__version__}")
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 0, 1, device
    rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return True, rank, local_rank, int(os.environ['WORLD_SIZE']), device

def end_ddp():
    """After the caller dropped its DDP module: no rank tears the group down while the master
    still writes its checkpoint; DDP sits in reference cycles, freed while its group exists."""
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()

def cpu_bf16_ok(asked=True, device_type='cpu'):
    """Whether bf16 autocast on CPU, as asked, pays: only where oneDNN has bf16 kernels for this
    CPU (AVX-512 or AMX). Elsewhere (AVX2 only) a bf16 matmul is ~200x slower than float32
    (BENCH.md): float32 then, said once."""
    ok = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if asked and device_type == 'cpu' and not ok:
        print("cpu_bf16: this CPU has no bf16 kernels (AVX2 only); float32 instead")
    return asked and ok

def autocast(device_type, dtype='bfloat16', cpu_bf16=False):
    """bf16 autocast on CUDA unless dtype is float32, on CPU where cpu_bf16 asks for it; the
    weights and optimizer state stay fp32 (the master copy)."""
    if device_type == 'cuda' and dtype != 'float32':
        return torch.autocast('cuda', getattr(torch, dtype))
    return torch.autocast('cpu', torch.bfloat16) if device_type == 'cpu' and cpu_bf16 else \
        nullcontext()

def get_lr(it, learning_rate, warmup_iters, decay_iters, min_lr):
    """Linear warmup, then cosine decay to min_lr at decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

class Loader:
    """data.Batches read in order from a position {epoch, step} that a checkpoint keeps: a resumed
    run reads the same batches as one that never stopped."""

    def __init__(self, batches, state=None):
        self.batches, self.state = batches, dict(state or {'epoch': 0, 'step': 0})

    def next(self):
        plan = self.batches.plan(self.state['epoch'])
        if self.state['step'] >= len(plan):
            self.state.update(epoch=self.state['epoch'] + 1, step=0)
            plan = self.batches.plan(self.state['epoch'])
        self.state['step'] += 1
        return self.batches.collate(plan[self.state['step'] - 1])

class EncoderCache:
    """Outputs of a frozen encoder per audio file, rounded to float16, in memory and optionally on
    disk. Only valid when every mel has the same length (n_frames fixed, e.g. Whisper's 30-s
    window): otherwise the padding changes them."""
    FEATURES = "transcribe-mel-2"  # in the key: files cached from other features are not read

    def __init__(self, encoder, directory="", ctx=nullcontext()):
        self.encoder, self.directory, self.ctx, self.mem = encoder, directory, ctx, {}
        w = encoder.conv1.weight  # tells encoders apart in a shared cache directory
        self.tag = f"{w.sum().item():.6e}{w.shape}{encoder.ln_post.weight.sum().item():.6e}"
        if directory:
            os.makedirs(directory, exist_ok=True)

    def _file(self, path, T):  # size and mtime in the key: a regenerated corpus is not read stale
        st = os.stat(path)
        key = (f"{self.FEATURES}|{self.tag}|{T}|{os.path.abspath(path)}|{st.st_size}|"
               f"{st.st_mtime_ns}")
        return os.path.join(self.directory, hashlib.sha1(key.encode()).hexdigest() + ".pt")

    @torch.no_grad()
    def __call__(self, mel, paths):
        T = mel.shape[-1]
        missing = [b for b, p in enumerate(paths) if (p, T) not in self.mem]
        for b in list(missing):
            file = self._file(paths[b], T) if self.directory else None
            if file and os.path.exists(file):
                self.mem[paths[b], T] = torch.load(file, map_location="cpu", weights_only=True)
                missing.remove(b)
        if missing:
            with self.ctx:
                out = self.encoder(mel[missing]).to(torch.float16).cpu()
            for b, xa in zip(missing, out):
                self.mem[paths[b], T] = xa.clone()
                if self.directory:
                    file = self._file(paths[b], T)
                    torch.save(xa.clone(), file + ".tmp")
                    os.replace(file + ".tmp", file)
        return torch.stack([self.mem[p, T] for p in paths]).to(mel.device).float()

def same_encoder(a, b):
    """Whether two models' encoders hold the same weights (one frozen encoder serves both)."""
    sd_a, sd_b = a.encoder.state_dict(), b.encoder.state_dict()
    return sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k].to(sd_a[k].device))
                                              for k in sd_a)

def fits(row, model, tok, n_new):
    """Whether the model takes this clip: its frames, and its prompt plus n_new tokens."""
    d = model.dims
    prompt = tok.prompt(row['duration'] * 100) if isinstance(model, AudioLLM) else \
        tok.sot_sequence(row.get('lang'))
    return len(prompt) + n_new <= d.n_text_ctx and \
        row['duration'] * 100 <= d.n_audio_ctx * d.conv_stride

def with_dropout(model, dropout):
    """The model rebuilt with another dropout (a module attribute fixed at construction)."""
    if model.dims.dropout == dropout:
        return model
    weights, grads = model.state_dict(), {n: p.requires_grad for n, p in model.named_parameters()}
    model = type(model)(dataclasses.replace(model.dims, dropout=dropout))
    model.load_state_dict(weights)
    for n, p in model.named_parameters():
        p.requires_grad_(grads[n])
    return model

def freeze(model, names):
    """Train every parameter but those named (and those already frozen) -> the frozen names."""
    frozen = sorted(set(names) | {n for n, p in model.named_parameters() if not p.requires_grad})
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    return frozen

def adamw(model, learning_rate, weight_decay, betas, device_type, lm_lr_scale=1.0):
    """AdamW on the trainable parameters (fp32): weight decay on matrices only; the audio-LLM's
    LM (which already reads text and listens) at lm_lr_scale of its fresh adapter's rate. Each
    group's 'lr_scale' multiplies the schedule's learning rate."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lm = lambda n: isinstance(model, AudioLLM) and n.startswith('decoder.') and \
        not n.startswith('decoder.adapter.')
    groups = [{'params': [p for n, p in named if (p.dim() >= 2) == decay and lm(n) == in_lm],
               'weight_decay': weight_decay if decay else 0.0,
               'lr_scale': lm_lr_scale if in_lm else 1.0}
              for decay in (True, False) for in_lm in (False, True)]
    return torch.optim.AdamW([g for g in groups if g['params']], lr=learning_rate, betas=betas,
                             **({'fused': True} if device_type == 'cuda' else {}))

def distil_whisper_loss(logits, t_logits, targets, tau=2.0, kl_weight=1.0):
    """distil-whisper's objective at N labeled positions (its training script's weights): 0.8 x the
    cross-entropy on the labels (the teacher's transcripts) + kl_weight x tau^2 x KL(p_T || p_S),
    both models' full-vocabulary distributions at temperature tau, a mean over positions.
    logits, t_logits: (N, V) student's and teacher's -> (loss, ce, kl)."""
    ce = F.cross_entropy(logits, targets)
    kl = tau ** 2 * F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(t_logits / tau, -1),
                             reduction='batchmean', log_target=True)
    return 0.8 * ce + kl_weight * kl, ce.detach(), kl.detach()

def update(optimizer, params, grad_clip):
    """One optimizer step: the gradient norm clipped to grad_clip (0 = off), then cleared."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

def save_checkpoint(path, model, optimizer, tokenizer, **state):
    """Everything init_from='resume' needs to go on bit-exactly, saved atomically."""
    atomic_save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                 'model_args': dataclasses.asdict(model.dims), 'tokenizer': tokenizer.to_dict(),
                 **state}, path)
    print(f"saved checkpoint to {path}")

def resume(checkpoint, optimizer, out_dir, master):
    """The optimizer and the torch RNG back from a checkpoint; the log cut back to its iteration
    (the records past it are done again) -> (iter_num, best_val_wer, loader position)."""
    optimizer.load_state_dict(checkpoint['optimizer'])
    torch.set_rng_state(checkpoint['rng']['torch'])
    if master:
        trim_log(os.path.join(out_dir, 'log.jsonl'), checkpoint['iter_num'])
    return checkpoint['iter_num'], checkpoint['best_val_wer'], checkpoint['loader']

def trim_log(path, iter_num):
    """Keep the records of log.jsonl up to iter_num."""
    if os.path.exists(path):
        with open(path) as f:
            records = [r for r in f if json.loads(r)['iter'] <= iter_num]
        with open(path, 'w') as f:
            f.writelines(records)

def log_json(out_dir, record):
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')
