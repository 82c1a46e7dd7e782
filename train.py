"""
Train a Whisper-architecture ASR model: from scratch (with its own SentencePiece tokenizer), from Whisper weights,
or a smaller student of Whisper weights. Runs on one CPU/GPU or with DDP:

    python train.py config/train_grammar_small.py
    python train.py config/train_grammar_small.py --batch_size=16 --max_iters=200
    torchrun --standalone --nproc_per_node=8 train.py config/train_grammar_teacher.py

Loss: cross-entropy of the decoder's next-token predictions (optionally label-smoothed), plus ctc_weight times a CTC
loss of model.ctc_head over the encoder frames (it gives the encoder an alignment long before cross-attention finds one).
Checkpoints (out_dir/ckpt.pt, the latest state) hold everything init_from='resume' needs to continue bit-exactly on CPU:
weights, AdamW state, RNG states and the position in the data (epoch, batch).
"""
import dataclasses
import gc
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import evaluate
from model import ModelDimensions, Whisper

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
eval_only = False  # evaluate the initial model on val (and test_manifest) and exit
always_save_checkpoint = False  # False: mid-run saves only when val WER improves (the end of the run always saves)
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt), or a path: Whisper weights (.pt / HF dir / CT2 dir) or our ckpt
student_layers = 0  # > 0: train teacher.make_student(<init_from model>, student_layers decoder layers)
freeze_encoder = True  # for the student
# data
train_manifest = 'data/synth_grammar/train.jsonl'
val_manifest = 'data/synth_grammar/val.jsonl'
test_manifest = ''  # evaluated at the end of training if set
tokenizer_path = ''  # from scratch: '' trains a SentencePiece model on the train texts; or a .model file / a ckpt.pt
vocab_size = 256
lowercase = True  # lower-case the texts (and the tokenizer's training texts) before tokenizing
language = ''  # decoder prompt language (Whisper tokenizers); '' = each row's "lang"
n_frames = 0  # pad every mel to this many frames (3000 for Whisper weights, chosen automatically); 0 = longest in batch
batch_size = 32  # utterances per micro-batch (per process) ...
batch_seconds = 0.0  # ... or, if > 0, at most this many seconds of padded audio per micro-batch
gradient_accumulation_steps = 1  # global: divided by the number of DDP processes
curriculum_iters = 0  # for the first curriculum_iters iterations ...
curriculum_seconds = 0.0  # ... train only on utterances at most this long
spec_augment = False
# model (from scratch)
n_mels = 80
n_audio_ctx = 1500
n_audio_state = 256
n_audio_head = 4
n_audio_layer = 4
n_text_ctx = 128
n_text_state = 256
n_text_head = 4
n_text_layer = 4
conv_stride = 2  # 4: the encoder runs at 25 frames/s instead of 50
dropout = 0.0
# loss
ctc_weight = 0.0  # > 0 adds a CTC head on the encoder (blank = n_vocab)
label_smoothing = 0.0
# AdamW and the learning-rate schedule
learning_rate = 1e-3
max_iters = 2000
weight_decay = 0.1  # on 2-D parameters only
beta1 = 0.9
beta2 = 0.98
grad_clip = 1.0  # 0 = off
decay_lr = True
warmup_iters = 100
lr_decay_iters = 0  # 0 = max_iters
min_lr = 1e-4
max_minutes = 0.0  # > 0: stop (and save) after this much wall time
# evaluation
val_max_utts = 200
eval_batch_size = 64
# system
device = ''  # '' = cuda if available, else cpu
dtype = 'bfloat16'  # autocast dtype on CUDA ('float32' = off); CPU always runs float32
compile = False
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

def fail(msg):
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(1)

ddp = int(os.environ.get('RANK', -1)) != -1
device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by {world_size} processes")
    gradient_accumulation_steps //= world_size
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.manual_seed(seed)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
ctx = nullcontext() if device_type == 'cpu' or dtype == 'float32' else torch.autocast('cuda', dtype=getattr(torch, dtype))
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if master:
    os.makedirs(out_dir, exist_ok=True)

def load_rows(path):
    rows = data.read_manifest(path)
    for row in rows:
        if lowercase and row.get('text') is not None:
            row['text'] = row['text'].lower()
        if row.get('duration') is None:
            row['duration'] = sf.info(row['audio']).duration
    return rows

train_rows, val_rows = load_rows(train_manifest), load_rows(val_manifest)[:val_max_utts]

# model and tokenizer
checkpoint, frozen = None, []
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        fail(f"init_from='resume' but {ckpt_path} does not exist")
    checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    model = Whisper(ModelDimensions(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    tokenizer = data.tokenizer_from_dict(checkpoint['tokenizer'])
    frozen = checkpoint.get('frozen', [])
elif init_from == 'scratch':
    if tokenizer_path.endswith('.model'):
        tokenizer = data.SentencePieceTokenizer(open(tokenizer_path, 'rb').read())
    elif tokenizer_path:
        tokenizer = data.tokenizer_from_dict(torch.load(tokenizer_path, map_location='cpu', weights_only=False)['tokenizer'])
    else:  # rank 0 trains it, the others receive it
        obj = [data.SentencePieceTokenizer.train([r['text'] for r in train_rows if r.get('text')], vocab_size).to_dict()
               if master else None]
        if ddp:
            dist.broadcast_object_list(obj, src=0)
        tokenizer = data.tokenizer_from_dict(obj[0])
    dims = ModelDimensions(n_mels, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, tokenizer.n_vocab, n_text_ctx,
                           n_text_state, n_text_head, n_text_layer, conv_stride=conv_stride, ctc=ctc_weight > 0, dropout=dropout)
    model = Whisper(dims)
else:
    model, tokenizer = evaluate.load_checkpoint(init_from)
    if student_layers > 0:
        try:
            from teacher import make_student
        except ImportError as e:
            fail(f"student_layers={student_layers} needs teacher.make_student ({e})")
        model = make_student(model, n_decoder_layers=student_layers, freeze_encoder=freeze_encoder)
    if ctc_weight > 0 and model.ctc_head is None:  # a fresh CTC head on the pretrained encoder
        model.dims = dataclasses.replace(model.dims, ctc=True)
        model.ctc_head = nn.Linear(model.dims.n_audio_state, model.dims.n_vocab + 1)
        Whisper._init_weights(model.ctc_head)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
for n, p in model.named_parameters():
    p.requires_grad_(n not in frozen)
dims = model.dims
if ctc_weight > 0 and model.ctc_head is None:
    fail("ctc_weight > 0 but the checkpoint has no CTC head")
if not n_frames and dims.n_audio_ctx == 1500 and tokenizer.to_dict()['kind'] == 'whisper':
    n_frames = data.N_FRAMES  # Whisper weights only know 30-s windows
model.to(device)

def fits(row):  # drop what the model cannot take: too many tokens or frames
    n_tok = len(tokenizer.sot_sequence(language or row.get('lang'))) + len(tokenizer.encode_text(row.get('text') or '')) + 1
    return n_tok <= dims.n_text_ctx and row['duration'] * 100 <= dims.n_audio_ctx * dims.conv_stride

n_rows = len(train_rows)
train_rows = [r for r in train_rows if fits(r)]
if master and len(train_rows) < n_rows:
    print(f"skipping {n_rows - len(train_rows)} training utterances longer than the model's context")
if not train_rows:
    fail(f"no usable training utterances in {train_manifest}")

def make_batches(rows, shuffle=True, bs=None):
    size = dict(max_seconds=batch_seconds) if batch_seconds > 0 and bs is None else dict(batch_size=bs or batch_size)
    return data.Batches(rows, tokenizer, seed=seed, rank=rank if shuffle else 0, world_size=world_size if shuffle else 1,
                        n_mels=dims.n_mels, n_frames=n_frames or None, language=language or None, shuffle=shuffle, **size)

phases = [make_batches(train_rows)]
if curriculum_iters > 0:  # phase 0: the short utterances only; phase 1: all of them
    short = [r for r in train_rows if r['duration'] <= curriculum_seconds]
    phases.insert(0, make_batches(short or train_rows))
val_batches = make_batches(val_rows, shuffle=False, bs=eval_batch_size)
max_new_tokens = min(dims.n_text_ctx - len(tokenizer.sot_sequence(language or None)), dims.n_text_ctx // 2)

# optimizer: weight decay on matrices and embeddings only
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                               {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), **({'fused': True} if device_type == 'cuda' else {}))
iter_num, best_val_wer = 0, float('inf')
loader = {'phase': 0, 'epoch': 0, 'step': 0}  # the next batch to read
aug_gen = torch.Generator().manual_seed(seed + rank)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    iter_num, best_val_wer, loader = checkpoint['iter_num'], checkpoint['best_val_wer'], checkpoint['loader']
    torch.set_rng_state(checkpoint['rng']['torch'])
    aug_gen.set_state(checkpoint['rng']['aug'])
    if device_type == 'cuda' and checkpoint['rng'].get('cuda') is not None:
        torch.cuda.set_rng_state(checkpoint['rng']['cuda'])
    checkpoint = None

class ASRLoss(nn.Module):
    """Whisper -> (total loss, cross-entropy, CTC) for a batch; one module so that DDP and torch.compile see it all."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, mel, mel_lengths, tokens, targets):
        xa = self.model.encoder(mel)
        logits = self.model.decoder(tokens, xa)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=label_smoothing)
        if ctc_weight <= 0:
            return ce, ce.detach(), torch.zeros((), device=ce.device)
        logp = F.log_softmax(self.model.ctc_head(xa).float(), dim=-1).transpose(0, 1)  # (T, B, V + 1)
        in_lens = torch.div(mel_lengths + self.model.dims.conv_stride - 1, self.model.dims.conv_stride,
                            rounding_mode='floor').clamp(max=xa.shape[1])
        # CTC targets: the text tokens, i.e. the scored targets without EOT
        keep = (targets != -100) & (targets != tokenizer.eot)
        ctc = F.ctc_loss(logp, targets[keep], in_lens, keep.sum(1), blank=self.model.dims.n_vocab,
                         reduction='mean', zero_infinity=True)
        return (1 - ctc_weight) * ce + ctc_weight * ctc, ce.detach(), ctc.detach()

raw_model = model
train_module = ASRLoss(model)
if compile:
    if master:
        print("compiling the model...")
    torch._inductor.config.triton.coalesce_tiling_analysis = False  # asserts on dynamic shapes (torch 2.11, H100)
    train_module = torch.compile(train_module, dynamic=True)
if ddp:
    train_module = DDP(train_module, device_ids=[local_rank] if device_type == 'cuda' else None)

def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    decay_iters = lr_decay_iters or max_iters
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

def get_batch():
    """The next training batch, following the loader position (so a resumed run reads the same batches)."""
    if loader['phase'] == 0 and len(phases) == 2 and iter_num >= curriculum_iters:
        loader.update(phase=1, epoch=0, step=0)
    batches = phases[loader['phase']]
    plan = batches.plan(loader['epoch'])
    if loader['step'] >= len(plan):
        loader.update(epoch=loader['epoch'] + 1, step=0)
        plan = batches.plan(loader['epoch'])
    batch = batches.collate(plan[loader['step']])
    loader['step'] += 1
    return batch

def to_device(batch):
    return [batch[k].to(device, non_blocking=True) for k in ('mel', 'mel_lengths', 'tokens', 'targets')]

@torch.no_grad()
def run_eval(rows, batches=None):
    """Greedy WER (evaluate.report) on rows, and the mean losses over batches."""
    model.eval()
    out = {}
    if batches is not None:
        sums = torch.zeros(3)
        for n, batch in enumerate(batches, 1):
            with ctx:
                sums += torch.stack(ASRLoss(raw_model)(*to_device(batch))).float().cpu()
        out.update(loss=(sums[0] / n).item(), ce=(sums[1] / n).item(), ctc=(sums[2] / n).item())
    t0 = time.time()
    with ctx:
        hyps = evaluate.transcribe(raw_model, tokenizer, rows, eval_batch_size, language=language or None,
                                   n_frames=n_frames or None, max_new_tokens=max_new_tokens)
    out['report'] = evaluate.report(rows, hyps, time.time() - t0, language or None)
    out['wer'] = out['report']['wer']
    model.train()
    return out

def log_json(record):
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')

def save_checkpoint():
    ckpt = {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), 'model_args': dataclasses.asdict(dims),
            'iter_num': iter_num, 'best_val_wer': best_val_wer, 'config': config, 'tokenizer': tokenizer.to_dict(),
            'frozen': frozen, 'loader': dict(loader),
            'rng': {'torch': torch.get_rng_state(), 'aug': aug_gen.get_state(),
                    'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}}
    torch.save(ckpt, ckpt_path + '.tmp')
    os.replace(ckpt_path + '.tmp', ckpt_path)
    print(f"saved checkpoint to {ckpt_path}")

def print_table(name, res):
    printer = getattr(evaluate, 'print_table', None)
    if printer is not None:
        return printer(res)
    print(f"{name:<6} {res['metric'].upper():>7} {'N':>7} {'S':>6} {'D':>6} {'I':>6} {'utts':>6} {'RTFx':>7}")
    print(f"{'':<6} {100 * res['wer']:6.2f}% {res['n']:>7} {res['s']:>6} {res['d']:>6} {res['i']:>6} "
          f"{res['utterances']:>6} {res['rtfx']:>7.1f}")

if master:
    n_params = raw_model.get_num_params()
    print(f"model: {n_params / 1e6:.2f}M parameters ({raw_model.get_num_params('encoder') / 1e6:.2f}M encoder), "
          f"{dims.n_audio_layer}+{dims.n_text_layer} layers, width {dims.n_audio_state}/{dims.n_text_state}, "
          f"vocab {dims.n_vocab}, conv_stride {dims.conv_stride}; {len(train_rows)} training utterances "
          f"({sum(r['duration'] for r in train_rows) / 3600:.2f} h), {world_size} process(es)")
if eval_only:
    if master:
        res = run_eval(val_rows, val_batches)
        print(f"val: loss {res['loss']:.4f}, WER {100 * res['wer']:.2f}%")
        if test_manifest:
            print_table('test', run_eval(load_rows(test_manifest))['report'])
    if ddp:
        dist.destroy_process_group()
    sys.exit(0)

# -----------------------------------------------------------------------------
# training loop
t_start = time.time()
start_iter = saved_iter = iter_num
time_up = False
t0 = time.time()
model.train()
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    done = iter_num >= max_iters or time_up
    if (iter_num % eval_interval == 0 or done) and iter_num > start_iter and master:
        res = run_eval(val_rows, val_batches)
        if not all(math.isfinite(res[k]) for k in ('ce', 'ctc')):
            fail(f"iter {iter_num}: non-finite val loss (ce {res['ce']}, ctc {res['ctc']}); stopping without saving "
                 f"a checkpoint (lower learning_rate or check the data)")
        minutes = (time.time() - t_start) / 60
        print(f"iter {iter_num}: val loss {res['loss']:.4f} (ce {res['ce']:.4f}, ctc {res['ctc']:.4f}), "
              f"val WER {100 * res['wer']:.2f}% on {len(val_rows)} utts, {minutes:.1f} min")
        log_json({'iter': iter_num, 'val_loss': res['loss'], 'val_ce': res['ce'], 'val_ctc': res['ctc'],
                  'val_wer': res['wer'], 'minutes': minutes})
        improved = res['wer'] < best_val_wer
        best_val_wer = min(best_val_wer, res['wer'])
        if improved or always_save_checkpoint:
            save_checkpoint()
            saved_iter = iter_num
        t0 = time.time()  # the time spent evaluating is not training time
    if done:
        if time_up and master:
            print(f"max_minutes={max_minutes} reached at iter {iter_num}")
        break
    audio = 0.0
    flops = 0
    sums = torch.zeros(4, device=device)  # loss, ce, ctc, audio seconds
    for micro_step in range(gradient_accumulation_steps):
        batch = get_batch()
        mel, mel_lengths, tokens, targets = to_device(batch)
        if spec_augment:
            mel = data.spec_augment(mel, mel_lengths, generator=aug_gen)
        if ddp:
            train_module.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with ctx:
            loss, ce, ctc = train_module(mel, mel_lengths, tokens, targets)
        (loss / gradient_accumulation_steps).backward()
        sums += torch.stack([loss.detach().float(), ce.float(), ctc.float(), batch['duration'].sum().to(device)])
        if device_type == 'cuda':
            flops += raw_model.estimate_flops(mel.shape[2], tokens.shape[1]) * mel.shape[0]
    time_up = max_minutes > 0 and time.time() - t_start > 60 * max_minutes
    sums = torch.cat([sums / gradient_accumulation_steps, torch.tensor([float(time_up)], device=device)])
    if ddp:
        dist.all_reduce(sums)
        sums[:4] /= world_size
    loss_f, ce_f, ctc_f, audio_f, time_up = sums.tolist()
    time_up = time_up > 0  # the same decision on every process
    if not all(math.isfinite(v) for v in (loss_f, ce_f, ctc_f)):
        which = ', '.join(f"{k} {v}" for k, v in (('ce', ce_f), ('ctc', ctc_f)) if not math.isfinite(v)) or f"loss {loss_f}"
        fail(f"iter {iter_num}: non-finite loss ({which}); stopping without saving a checkpoint "
             f"(lower learning_rate or check the data)")
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    if device_type == 'cuda':
        torch.cuda.synchronize()
    t1 = time.time()
    dt, t0 = t1 - t0, t1
    if iter_num % log_interval == 0 and master:
        audio_per_s = audio_f * world_size * gradient_accumulation_steps / dt
        line = (f"iter {iter_num}: loss {loss_f:.4f}" + (f" (ce {ce_f:.4f}, ctc {ctc_f:.4f})" if ctc_weight > 0 else "") +
                f", lr {lr:.1e}, {dt * 1000:.0f}ms/iter, {audio_per_s:.1f} audio-s/s")
        record = {'iter': iter_num, 'loss': loss_f, 'ce': ce_f, 'ctc': ctc_f, 'lr': lr, 'ms': dt * 1000,
                  'audio_s_per_s': audio_per_s, 'minutes': (t1 - t_start) / 60}
        if device_type == 'cuda':
            record['mfu'] = flops * world_size / dt / 989e12  # H100 bf16 dense peak
            line += f", mfu {100 * record['mfu']:.1f}%"
        print(line)
        log_json(record)

# the end: save the latest state, evaluate on test
if master:
    if iter_num > saved_iter:
        save_checkpoint()
    if test_manifest:
        res = run_eval(load_rows(test_manifest))['report']
        print_table('test', res)
        log_json({'iter': iter_num, 'test_wer': res['wer'], 'minutes': (time.time() - t_start) / 60})
if ddp:
    dist.barrier()  # wait for the master's checkpoint and test table before tearing the group down
    del train_module  # DDP sits in reference cycles: free it while its group exists (else gloo may SIGABRT at exit)
    gc.collect()
    dist.destroy_process_group()
