# The demo's td row (python demo.py --rows=td runs this file with its own paths and seed): base,
# fine-tuned on Whisper base's greedy transcripts of the 320 unlabeled clips (those that end;
# demo.py writes them to out/demo/teacher_labels.jsonl from the cached encoder outputs).
# Supervised like base (token noise, AdamW settings; base's frozen parts stay frozen), at the
# budget of the rows without labels: the same 100 updates of 16 as opd, no dropout, and the last
# weights (no val WER before the end). On its own, after python demo.py --rows=base,td:
#   python train.py config/train_demo_td.py
out_dir = 'out/demo_td'
init_from = 'out/demo/base/ckpt.pt'
encoder_cache_dir = 'out/demo/encoder_cache'  # the demo's cached base encoder outputs
train_manifest = 'out/demo/teacher_labels.jsonl'  # the teacher's transcripts
val_manifest = 'data/synth_piper_demo_dev/val.jsonl'  # dev (demo.py builds it)
val_max_utts = 150
eval_batch_size = 32
lowercase = False
cpu_bf16 = True
token_noise = 0.3
batch_size = 16
learning_rate = 3e-4
weight_decay = 0.005
beta2 = 0.95
warmup_iters = 5
max_iters = 100
min_lr = 1e-5
eval_interval = 1000000  # never during training: val WER once, at the end
always_save_checkpoint = True
log_interval = 5
