# A small ASR model trained from scratch on 2 CPU cores in about 12 minutes, on a synthetic espeak-ng
# corpus of command-like sentences; the test split's sentences are never seen in training.
#   python synth.py --out=data/synth_grammar --text=grammar --n_train=3000
#   python train.py config/train_grammar_small.py
# It learns fast because the encoder runs at 25 frames/s (conv_stride=4) and a CTC head on it gives
# it an alignment long before cross-attention finds one; a 256-piece vocabulary; small batches.
out_dir = 'out/grammar_small'
train_manifest = 'data/synth_grammar/train.jsonl'
val_manifest = 'data/synth_grammar/val.jsonl'
test_manifest = 'data/synth_grammar/test.jsonl'
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
warmup_iters = 100
max_iters = 2400
max_minutes = 12.0  # a safety net on a busy machine: stop, save and test anyway
eval_interval = 300
val_max_utts = 100
always_save_checkpoint = True  # the checkpoint is the final weights
log_interval = 50
