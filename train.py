"""
Supervised training of a Whisper-architecture ASR model, on one CPU/GPU or with DDP:

    python train.py config/train_grammar_small.py           # from scratch, its own SentencePiece
    python train.py --init_from=weights/base --student_layers=2 --train_manifest=labeled.jsonl
    python train.py config/train_ark_base.py    # the audio-LLM student (Ark-Base), supervised
    torchrun --standalone --nproc_per_node=2 train.py config/train_grammar_teacher.py

Every supervised run of the project goes through here: a model from scratch, Whisper weights
fine-tuned, the distillation student's base row (init_from=<teacher> + student_layers), and
teacher-data training (TD: a manifest of the teacher's transcripts, evaluate.py --out_manifest),
and the audio-LLM student (student='audio_llm': adapter + LM trained, CE on transcript + stop).
Loss: next-token cross-entropy, plus ctc_weight times a CTC loss of model.ctc_head on the encoder;
or, with a teacher (teacher_path), distil-whisper's objective: 0.8 x the cross-entropy on the
teacher's transcripts + kl_weight x the KL to the teacher along them (the demo's dw row).
Checkpoints (out_dir/ckpt.pt) hold what init_from='resume' needs to continue bit-exactly.
"""
import dataclasses
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import evaluate
from checkpoint import load_checkpoint
from student import make_audio_llm, make_chat_llm, make_student
from tokenizer import SentencePieceTokenizer, tokenizer_from_dict
from model import MERGE, AudioLLM, ModelDimensions, Whisper, length_mask

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
always_save_checkpoint = False  # False: save when val WER improves (or at the end if never)
init_from = 'scratch'  # 'scratch', 'resume', or a path: Whisper weights or our checkpoint
student_layers = 0  # > 0: train make_student(<init_from model>): its encoder frozen
student = 'whisper'  # 'audio_llm': make_audio_llm(<init_from>, student_layers or 2); 'chat_llm':
llm = 'smollm2'  # make_chat_llm(<init_from>, llm: a LLaMA .gguf or SmolLM2, student_layers or 30)
freeze_embeddings = False  # token (= tied output) and position embeddings frozen too
lm_lr_scale = 1.0  # the audio-LLM: its LM's learning rate as a share of the fresh adapter's
encoder_cache_dir = ''  # a frozen encoder's outputs per clip kept here (Whisper's 30-s window only)
# data
train_manifest = 'data/synth_grammar/train.jsonl'
val_manifest = 'data/synth_grammar/val.jsonl'
test_manifest = ''  # evaluated at the end of training if set
vocab_size = 256
lowercase = True  # lower-case the texts before tokenizing
batch_size = 32  # utterances per micro-batch (per process)
gradient_accumulation_steps = 1  # global: divided by the number of DDP processes
token_noise = 0.0  # that fraction of the transcript tokens the decoder reads swapped at random
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
ctc_weight = 0.0  # > 0 adds a CTC head on the encoder (blank = n_vocab; audio-LLM: see ASRLoss)
# distil-whisper's objective (its training script's defaults): a frozen teacher, the same tokenizer
teacher_path = ''  # loss = 0.8 CE + kl_weight * kl_tau^2 * KL(p_T || p_S) at temperature kl_tau
kl_weight = 1.0
kl_tau = 2.0
# AdamW and the learning-rate schedule
learning_rate = 1e-3
max_iters = 2000
weight_decay = 0.1  # on 2-D parameters only
beta2 = 0.98  # beta1 0.9
grad_clip = 1.0  # 0 = off
decay_lr = True
warmup_iters = 100
lr_decay_iters = 0  # 0 = max_iters
min_lr = 1e-4
max_minutes = 0.0  # > 0: stop (and save) after this much wall time
val_max_utts = 200
eval_batch_size = 64
# system
device = ''  # '' = cuda if available, else cpu
dtype = 'bfloat16'  # autocast dtype on CUDA ('float32' = off)
cpu_bf16 = False  # bf16 autocast for training on CPU too (fp32 weights; evaluation stays float32)
compile = False
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

fail = common.fail
common.one_line_errors()  # bad input (a file, a value) met below: one line, not a traceback
for k in ('batch_size', 'gradient_accumulation_steps', 'eval_batch_size', 'eval_interval',
          'log_interval', 'val_max_utts'):
    if globals()[k] <= 0:
        fail(f"{k}={globals()[k]}: must be positive")
if max_iters < 0 or learning_rate <= 0:
    fail(f"max_iters={max_iters}, learning_rate={learning_rate}: need max_iters >= 0, lr > 0")
ddp, rank, local_rank, world_size, device = common.init_ddp(device)
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps}: not a multiple of "
         f"{world_size} processes")
gradient_accumulation_steps //= world_size
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.manual_seed(seed)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
cpu_bf16 = common.cpu_bf16_ok(cpu_bf16, device_type)
ctx = common.autocast(device_type, dtype, cpu_bf16)
eval_ctx = ctx if device_type == 'cuda' else nullcontext()
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if master:
    os.makedirs(out_dir, exist_ok=True)

def load_rows(path):  # every clip's header is read now: a bad one stops the run before it starts
    rows = data.check_audio(data.read_manifest(path))
    for row in rows:
        if lowercase and row.get('text') is not None:
            row['text'] = row['text'].lower()
    return rows

train_rows, val_rows = load_rows(train_manifest), load_rows(val_manifest)[:val_max_utts]
test_rows = load_rows(test_manifest) if test_manifest else []

# model and tokenizer
checkpoint, frozen = None, []
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        fail(f"init_from='resume' but {ckpt_path} does not exist")
    model, tokenizer, checkpoint = load_checkpoint(ckpt_path)
    frozen = checkpoint.get('frozen', [])
elif init_from == 'scratch':  # a SentencePiece model of the training texts: rank 0 trains it
    texts = [r['text'] for r in train_rows if r.get('text')]
    obj = [SentencePieceTokenizer.train(texts, vocab_size).to_dict() if master else None]
    if ddp:
        dist.broadcast_object_list(obj, src=0)
    tokenizer = tokenizer_from_dict(obj[0])
    model = Whisper(ModelDimensions(n_mels, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer,
                                    tokenizer.n_vocab, n_text_ctx, n_text_state, n_text_head,
                                    n_text_layer, conv_stride, ctc_weight > 0, dropout))
else:
    model, tokenizer, ckpt = load_checkpoint(init_from)
    frozen = (ckpt or {}).get('frozen', [])  # a student's base row keeps its frozen parts
    if student == 'audio_llm':
        model, tokenizer = make_audio_llm(model, tokenizer, student_layers or 2)
    elif student == 'chat_llm':
        model, tokenizer = make_chat_llm(model, llm, student_layers or 30)
    elif student_layers > 0:
        model = make_student(model, student_layers)
    model = common.with_dropout(model, dropout)
    if ctc_weight > 0 and model.ctc_head is None and not isinstance(model, AudioLLM):
        model.dims = dataclasses.replace(model.dims, ctc=True)
        model.ctc_head = nn.Linear(model.dims.n_audio_state, model.dims.n_vocab + 1)
        Whisper._init_weights(model.ctc_head)
    if freeze_embeddings:
        model.decoder.token_embedding.requires_grad_(False)
        if hasattr(model.decoder, 'positional_embedding'):  # (RoPE has none)
            model.decoder.positional_embedding.requires_grad_(False)
frozen = common.freeze(model, frozen)
dims = model.dims
audio_llm = isinstance(model, AudioLLM)
if ctc_weight > 0 and model.ctc_head is None and not audio_llm:
    fail("ctc_weight > 0 but the checkpoint has no CTC head")
teacher, aux = None, 'kl' if teacher_path else 'ctc'  # the loss's second term, as logged
if teacher_path:
    teacher, t_tok, _ = load_checkpoint(teacher_path, device)
    if ctc_weight > 0 or t_tok.to_dict() != tokenizer.to_dict() or audio_llm:
        fail(f"teacher_path={teacher_path}: distil-whisper's objective takes a Whisper student of "
             f"the teacher's own tokenizer, and no CTC")
    teacher.requires_grad_(False)
    shared_encoder = common.same_encoder(model, teacher)
n_frames = evaluate.whisper_frames(model, tokenizer)  # 3000 for Whisper weights, else None
model.to(device)
# a frozen encoder on fixed-length mels: its outputs are computed once per clip (and kept on disk)
enc_frozen = not any(p.requires_grad for p in model.encoder.parameters())
encode = None
if enc_frozen and n_frames:  # under the training autocast (bf16 where it is on)
    encode = common.EncoderCache(model.encoder, encoder_cache_dir, ctx)

# drop what the model cannot take: too many tokens (prompt, text, EOT) or frames
fits = lambda r: common.fits(r, model, tokenizer,
                             len(tokenizer.encode_text(r.get('text') or '')) + 1)
n_rows, n_val = len(train_rows), len(val_rows)
train_rows, val_rows = [r for r in train_rows if fits(r)], [r for r in val_rows if fits(r)]
if master and len(train_rows) + len(val_rows) < n_rows + n_val:
    print(f"skipping {n_rows - len(train_rows)} training and {n_val - len(val_rows)} val "
          f"utterances too long for the model")
if not train_rows:
    fail(f"no usable training utterances in {train_manifest}")
beyond, limit = evaluate.too_long(model, tokenizer, test_rows, n_frames)
if beyond:  # the test set is scored whole: found now, not after training
    fail(f"{beyond[0][0]['audio']}: longer than the model takes ({limit / 100:.2f} s), and "
         f"{len(beyond) - 1} more clips of {test_manifest}; evaluate.py --truncate=True cuts them")
batches = data.Batches(train_rows, tokenizer, batch_size, seed=seed, rank=rank,
                       world_size=world_size, n_mels=dims.n_mels, n_frames=n_frames)
val_batches = data.Batches(val_rows, tokenizer, eval_batch_size, n_mels=dims.n_mels,
                           n_frames=n_frames, shuffle=False)
max_new_tokens = min(dims.n_text_ctx - len(tokenizer.sot_sequence()), dims.n_text_ctx // 2)

# optimizer: weight decay on matrices only; the audio-LLM's fresh adapter at learning_rate, its LM
# at lm_lr_scale of it: one rate for both either starves the adapter or wrecks the LM (RESULTS.md)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = common.adamw(model, learning_rate, weight_decay, (0.9, beta2), device_type, lm_lr_scale)
iter_num, best_val_wer, position = 0, float('inf'), None
aug_gen = torch.Generator().manual_seed(seed + rank)  # token noise
if checkpoint is not None:
    iter_num, best_val_wer, position = common.resume(checkpoint, optimizer, out_dir, master)
    aug_gen.set_state(checkpoint['rng']['aug'])
    if device_type == 'cuda' and checkpoint['rng'].get('cuda') is not None:
        torch.cuda.set_rng_state(checkpoint['rng']['cuda'])
    checkpoint = None

class ASRLoss(nn.Module):
    """Whisper -> (total loss, cross-entropy, CTC) for a batch; one module so that DDP and
    torch.compile see it all. xa: the encoder's outputs when they come from the cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, mel, mel_lengths, tokens, targets, xa=None):
        # mels padded to the longest in the batch: the padding is masked (Whisper's 30-s window
        # is not: the model was trained reading it)
        real = length_mask(mel_lengths, mel.shape[2])
        mask = real if n_frames is None else None
        xa = self.model.encoder(mel, mask) if xa is None else xa
        # the audio-LLM's adapter keeps the real audio's frames only, in Whisper's window too
        xa_mask = self.model.encoder.frames_mask(real if audio_llm else mask)
        zero = torch.zeros((), device=mel.device)
        ctc = self.ctc(xa, mel_lengths, targets, xa_mask) if ctc_weight > 0 else zero
        if ctc_weight >= 1:  # CTC alone: the decoder is not run
            return ctc, zero, ctc.detach()
        h = self.model.decoder(tokens, xa, xa_mask=xa_mask, project=False)
        scored = targets != -100  # only positions with a target go through the output layer
        w = self.model.decoder.token_embedding.weight  # tied
        logits = (h[scored].to(w.dtype) @ w.T).float()
        ce = F.cross_entropy(logits, targets[scored])
        if teacher is not None:  # distil-whisper: the teacher forced along the same labels
            with torch.no_grad():
                xa_t = xa if shared_encoder else teacher.encoder(mel, mask)
                t_logits = teacher.decoder(tokens, xa_t, xa_mask=xa_mask)[scored].float()
            return common.distil_whisper_loss(logits, t_logits, targets[scored], kl_tau, kl_weight)
        return (1 - ctc_weight) * ce + ctc_weight * ctc, ce.detach(), ctc.detach()

    def ctc(self, xa, mel_lengths, targets, xa_mask):
        """CTC of the transcript's tokens (no EOT). Whisper: model.ctc_head on the encoder frames,
        blank = n_vocab. Audio-LLM: the adapter's outputs read through the LM's tied embeddings,
        blank = <|audio|>, so the adapter learns to speak the LM's input language early."""
        keep = (targets != -100) & (targets != tokenizer.eot)  # CTC targets: the text, no EOT
        if audio_llm:
            in_lens = (xa_mask.sum(1) // MERGE).clamp(min=1)
            S = MERGE * in_lens.max()  # the frames past every clip's end are not read
            a = self.model.decoder.adapter(xa[:, :S], xa_mask[:, :S])
            w = self.model.decoder.token_embedding.weight  # tied
            logits, blank = a.to(w.dtype) @ w.T, tokenizer.audio
        else:
            stride = self.model.dims.conv_stride
            in_lens = torch.div(mel_lengths + stride - 1, stride, rounding_mode='floor')
            logits, blank = self.model.ctc_head(xa), self.model.dims.n_vocab
        logp = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
        return F.ctc_loss(logp, targets[keep], in_lens.clamp(max=logp.shape[0]), keep.sum(1),
                          blank=blank, reduction='mean', zero_infinity=True)

raw_model = model
train_module = ASRLoss(model)
if compile:
    if master:
        print("compiling the model...")
    train_module = torch.compile(train_module, dynamic=True)
if ddp:
    train_module = DDP(train_module, device_ids=[local_rank] if device_type == 'cuda' else None)

loader = common.Loader(batches, position)  # a resumed run reads the same batches

def to_device(batch):
    mel, lens, tokens, targets = (batch[k].to(device) for k in ('mel', 'mel_lengths', 'tokens',
                                                                 'targets'))
    with torch.no_grad():
        xa = encode(mel, batch['audio']) if encode is not None else None
    return mel, lens, tokens, targets, xa

@torch.no_grad()
def run_eval(rows, batches=None):
    """Greedy WER (evaluate.report) on rows, and the mean losses over batches."""
    model.eval()
    out = {}
    if batches is not None:
        sums = torch.zeros(3)
        for n, batch in enumerate(batches, 1):
            with eval_ctx:
                sums += torch.stack(ASRLoss(raw_model)(*to_device(batch))).float().cpu()
        out.update({'loss': (sums[0] / n).item(), 'ce': (sums[1] / n).item(),
                    aux: (sums[2] / n).item()})
    t0 = time.time()
    with eval_ctx:
        hyps = evaluate.transcribe(raw_model, tokenizer, rows, eval_batch_size, n_frames=n_frames,
                                   max_new_tokens=max_new_tokens, encode=encode)
    out['report'] = evaluate.report(rows, hyps, time.time() - t0)
    out['wer'] = out['report']['wer']
    model.train()
    return out

if master:
    print(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters "
          f"({raw_model.get_num_params('encoder') / 1e6:.2f}M encoder, "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M trained), "
          f"{dims.n_audio_layer}+{dims.n_text_layer} layers, width {dims.n_text_state}, "
          f"vocab {dims.n_vocab}; {len(train_rows)} training utterances "
          f"({sum(r['duration'] for r in train_rows) / 3600:.2f} h), {world_size} process(es)")
# -----------------------------------------------------------------------------
# training loop
t_start = t0 = time.time()
start_iter, saved, time_up = iter_num, False, False
model.train()
while True:
    lr = common.get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters or max_iters,
                       min_lr) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    done = iter_num >= max_iters or time_up
    # evaluate and checkpoint
    if (iter_num % eval_interval == 0 or done) and iter_num > start_iter and master:
        res = run_eval(val_rows, val_batches)
        if not all(math.isfinite(res[k]) for k in ('ce', aux)):
            fail(f"iter {iter_num}: non-finite val loss (ce {res['ce']}, {aux} {res[aux]}); "
                 f"stopping without saving a checkpoint (lower learning_rate or check the data)")
        minutes = (time.time() - t_start) / 60
        print(f"iter {iter_num}: val loss {res['loss']:.4f} (ce {res['ce']:.4f}, "
              f"{aux} {res[aux]:.4f}), "
              f"val WER {100 * res['wer']:.2f}% on {len(val_rows)} utts, {minutes:.1f} min")
        common.log_json(out_dir, {'iter': iter_num, 'val_loss': res['loss'], 'val_ce': res['ce'],
                                  f'val_{aux}': res[aux], 'val_wer': res['wer'],
                                  'minutes': minutes})
        improved = res['wer'] < best_val_wer
        best_val_wer = min(best_val_wer, res['wer'])
        if improved or always_save_checkpoint or (done and not saved):
            common.save_checkpoint(
                ckpt_path, raw_model, optimizer, tokenizer, iter_num=iter_num,
                best_val_wer=best_val_wer, config=config, frozen=frozen, loader=dict(loader.state),
                rng={'torch': torch.get_rng_state(), 'aug': aug_gen.get_state(),
                     'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None})
            saved = True
        t0 = time.time()  # the time spent evaluating is not training time
    if done:
        if time_up and master:
            print(f"max_minutes={max_minutes} reached at iter {iter_num}")
        break
    sums = torch.zeros(4, device=device)  # loss, ce, ctc or kl (aux), audio seconds
    flops = 0
    for micro_step in range(gradient_accumulation_steps):
        batch = loader.next()
        mel, mel_lengths, tokens, targets, xa = to_device(batch)
        if token_noise > 0:  # against greedy loops: swap some of the transcript tokens read
            tokens = data.token_noise(tokens, targets, token_noise, aug_gen)
        if ddp:
            train_module.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with ctx:
            loss, ce, second = train_module(mel, mel_lengths, tokens, targets, xa)
        (loss / gradient_accumulation_steps).backward()
        sums += torch.stack([loss.detach().float(), ce.float(), second.float(),
                             batch['duration'].sum().to(device)])
        if device_type == 'cuda':
            flops += raw_model.estimate_flops(mel.shape[2], tokens.shape[1]) * mel.shape[0]
    time_up = max_minutes > 0 and time.time() - t_start > 60 * max_minutes
    sums = torch.cat([sums / gradient_accumulation_steps,
                      torch.tensor([float(time_up)], device=device)])
    if ddp:
        dist.all_reduce(sums)
        sums[:4] /= world_size
    loss_f, ce_f, aux_f, audio_f, time_up = sums.tolist()
    time_up = time_up > 0  # the same decision on every process
    if not all(math.isfinite(v) for v in (loss_f, ce_f, aux_f)):
        which = ', '.join(f"{k} {v}" for k, v in (('ce', ce_f), (aux, aux_f))
                          if not math.isfinite(v))
        fail(f"iter {iter_num}: non-finite loss ({which or f'loss {loss_f}'}); stopping without "
             f"saving a checkpoint (lower learning_rate or check the data)")
    common.update(optimizer, params, grad_clip)
    iter_num += 1
    if device_type == 'cuda':
        torch.cuda.synchronize()
    t1 = time.time()
    dt, t0 = t1 - t0, t1
    if iter_num % log_interval == 0 and master:
        audio_per_s = audio_f * world_size * gradient_accumulation_steps / dt
        line = f"iter {iter_num}: loss {loss_f:.4f}"
        line += f" (ce {ce_f:.4f}, {aux} {aux_f:.4f})" if ctc_weight > 0 or teacher else ""
        line += f", lr {lr:.1e}, {dt * 1000:.0f}ms/iter, {audio_per_s:.1f} audio-s/s"
        record = {'iter': iter_num, 'loss': loss_f, 'ce': ce_f, aux: aux_f, 'lr': lr,
                  'ms': dt * 1000, 'audio_s_per_s': audio_per_s, 'minutes': (t1 - t_start) / 60}
        if device_type == 'cuda':
            record['mfu'] = flops * world_size / dt / 989e12  # H100 bf16 dense peak
            line += f", mfu {100 * record['mfu']:.1f}%"
        print(line)
        common.log_json(out_dir, record)

# the end: evaluate the final weights on test
if master and test_rows:
    res = run_eval(test_rows)['report']
    evaluate.print_table(res)
    common.log_json(out_dir, {'iter': iter_num, 'test_wer': res['wer'],
                              'minutes': (time.time() - t_start) / 60})
if ddp:
    del train_module
    common.end_ddp()
