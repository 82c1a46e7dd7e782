# The toy Table 1's base row (commands in config/distill_toy.py): the toy teacher's frozen encoder
# + its decoder layers 0 and 3, supervised on the 150 labeled clips; the best val WER's weights.
out_dir = 'out/toy/base'
init_from = 'out/toy/teacher/ckpt.pt'
student_layers = 2
train_manifest = 'data/synth_grammar/labeled.jsonl'
val_manifest = 'data/synth_grammar/val.jsonl'
val_max_utts = 100
token_noise = 0.3  # swap 30% of the transcript tokens the decoder reads (against greedy loops)
dropout = 0.1
batch_size = 32
learning_rate = 1e-3
weight_decay = 0.005
beta2 = 0.95
warmup_iters = 20
max_iters = 300
min_lr = 3e-5
eval_interval = 50
log_interval = 20
