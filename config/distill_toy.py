# Table 1 from scratch, no downloads: teacher and student both trained here on the espeak-ng grammar corpus (the demo's
# rows without Whisper; measured in README). This file is the opd row; the other rows override it on the command line:
#   python data.py synth --out=data/synth_grammar --text=grammar --n_train=3000
#   python train.py config/train_grammar_small.py --out_dir=out/toy/teacher     # teacher: 4+4 layers, ~9 min
#   head -n 150 data/synth_grammar/train.jsonl > data/synth_grammar/labeled.jsonl      # 5% keep their labels (next
#   tail -n +151 data/synth_grammar/train.jsonl > data/synth_grammar/unlabeled.jsonl   # to train.jsonl: audio paths
#                                                                                      # are relative to the manifest)
#   python distill.py config/distill_toy.py --mode=sft --init_from=teacher --train_manifest=data/synth_grammar/labeled.jsonl \
#       --out_dir=out/toy/base --max_iters=300 --learning_rate=1e-3 --dropout=0.1 --token_noise=0.3 \
#       --eval_interval=50 --always_save_checkpoint=False                      # base: the best val WER's weights
#   python distill.py config/distill_toy.py                                     # opd (never reads the texts)
#   python distill.py config/distill_toy.py --mode=td --token_noise=0.3 --out_dir=out/toy/td
#   python distill.py config/distill_toy.py --init_from=out/toy/td/ckpt.pt --out_dir=out/toy/td_opd
#   python evaluate.py --ckpt=out/toy/ROW/ckpt.pt --manifest=data/synth_grammar/test.jsonl   # ROW: teacher, base, ...
# The student: the teacher's encoder (frozen, shared) + 2 of its 4 decoder layers (the first and the last).
out_dir = 'out/toy/opd'
teacher_path = 'out/toy/teacher/ckpt.pt'
init_from = 'out/toy/base/ckpt.pt'
student_layers = 2
freeze_encoder = True
train_manifest = 'data/synth_grammar/unlabeled.jsonl'
val_manifest = 'data/synth_grammar/val.jsonl'
val_max_utts = 100
mode = 'opd'
loss = 'topk_union'
topk = 32
temperature = 0.0
ngram_stop = 4
loop_unlikelihood = 3.0
tokens_per_second = 8.0  # small SentencePiece vocabularies cut words into more pieces than Whisper's BPE
batch_size = 32
learning_rate = 3e-4
warmup_iters = 20
max_iters = 300
min_lr = 3e-5
eval_interval = 100
always_save_checkpoint = True  # the unlabeled rows keep their last weights, as in the demo
log_interval = 20
