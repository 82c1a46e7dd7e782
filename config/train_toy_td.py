# The toy Table 1's td row (commands in config/distill_toy.py): base, fine-tuned on the teacher's
# transcripts of the unlabeled clips (evaluate.py --out_manifest); the last weights.
out_dir = 'out/toy/td'
init_from = 'out/toy/base/ckpt.pt'
train_manifest = 'out/toy/teacher_labels.jsonl'
val_manifest = 'data/synth_grammar/val.jsonl'
val_max_utts = 100
token_noise = 0.3
batch_size = 32
learning_rate = 3e-4
weight_decay = 0.005
beta2 = 0.95
warmup_iters = 20
max_iters = 300
min_lr = 3e-5
eval_interval = 100
always_save_checkpoint = True
log_interval = 20
