# The toy teacher for the distillation demos: the small recipe's model, trained on ~7x the data for about an hour
# on 2 CPU cores (target: <= 20% WER on the test split's unseen sentences). 10,000 utterances overfit (train CE 0.09 vs
# val CE 0.29 at the end of 7,500 iterations, test WER 23.2%): 20,000, and more iterations.
#   python data.py synth --out=data/synth_grammar_20k --text=grammar --n_train=20000     # ~3 min
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
max_iters = 11500  # ~55 min alone on 2 cores (README)
max_minutes = 58.0
eval_interval = 500
val_max_utts = 100
log_interval = 100
