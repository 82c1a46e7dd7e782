# Table 1 from scratch, no downloads: teacher and student both trained here on the espeak-ng grammar
# corpus. This file is the opd row; the rest, in order:
#   python synth.py --out=data/synth_grammar --text=grammar --n_train=3000
#   python train.py config/train_grammar_small.py --out_dir=out/toy/teacher     # the teacher
#   head -n 150 data/synth_grammar/train.jsonl > data/synth_grammar/labeled.jsonl     # 5% labels
#   tail -n +151 data/synth_grammar/train.jsonl > data/synth_grammar/unlabeled.jsonl
#   python train.py config/train_toy_base.py                                    # base
#   python distill.py config/distill_toy.py                                     # opd
#   python evaluate.py --ckpt=out/toy/teacher/ckpt.pt --manifest=data/synth_grammar/unlabeled.jsonl \
#       --out_manifest=out/toy/teacher_labels.jsonl                             # the teacher's transcripts
#   python train.py config/train_toy_td.py                                      # td
#   python distill.py config/distill_toy.py --init_from=out/toy/td/ckpt.pt --out_dir=out/toy/td_opd
#   python evaluate.py --ckpt=out/toy/ROW/ckpt.pt --manifest=data/synth_grammar/test.jsonl
out_dir = 'out/toy/opd'
teacher_path = 'out/toy/teacher/ckpt.pt'
init_from = 'out/toy/base/ckpt.pt'
train_manifest = 'data/synth_grammar/unlabeled.jsonl'
val_manifest = 'data/synth_grammar/val.jsonl'
val_max_utts = 100
loss = 'topk_union'
topk = 32
temperature = 0.0
ngram_stop = 4
loop_unlikelihood = 3.0
tokens_per_second = 8.0  # a 256-piece vocabulary cuts words into more pieces than Whisper's BPE
batch_size = 32
learning_rate = 3e-4
warmup_iters = 20
max_iters = 300
min_lr = 3e-5
eval_interval = 100
always_save_checkpoint = True  # the unlabeled rows keep their last weights, as in the demo
log_interval = 20
