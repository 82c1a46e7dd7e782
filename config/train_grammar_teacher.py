# The toy teacher for the distillation demos: the small recipe's model on ~7x the data, for about an
# hour on 2 CPU cores (RESULTS.md has its curve).
#   python synth.py --out=data/synth_grammar_20k --text=grammar --n_train=20000
#   python train.py config/train_grammar_teacher.py
out_dir = 'out/grammar_teacher'
train_manifest = 'data/synth_grammar_20k/train.jsonl'
val_manifest = 'data/synth_grammar_20k/val.jsonl'
test_manifest = 'data/synth_grammar_20k/test.jsonl'
vocab_size = 256
lowercase = True

n_audio_state = n_text_state = 256
n_audio_head = n_text_head = 4
n_audio_layer = 4
n_text_layer = 4
n_audio_ctx = 500  # 20 s at 25 frames/s
n_text_ctx = 128
conv_stride = 4
ctc_weight = 0.5

batch_size = 16
learning_rate = 2e-3
min_lr = 1e-4
warmup_iters = 200
max_iters = 11500
max_minutes = 58.0
eval_interval = 500
val_max_utts = 100
always_save_checkpoint = True  # the checkpoint is the final weights
log_interval = 100
