# The demo's ark_td row (python demo.py --rows=ark_td runs this file with its own paths and seed,
# after python demo.py --rows=ark_base): the paper's TD on the audio-LLM student. Ark-Base,
# fine-tuned on Whisper base's greedy transcripts of the 2,000 ark clips (those that end; demo.py
# writes them to out/demo/ark_teacher_labels.jsonl from the cached encoder outputs), supervised
# like Ark-Base (token noise; its frozen parts stay frozen) at ark_opd's budget: the same 160
# updates of 16 at its rate, every part at one rate as in distill.py, the last weights: on dev,
# 3e-4 or 320 updates did no better (RESULTS.md). On its own, after that demo run:
# python train.py config/train_ark_td.py
out_dir = 'out/demo/ark_td'
init_from = 'out/demo/ark_base/ckpt.pt'
encoder_cache_dir = 'out/demo/encoder_cache'  # the demo's cached base encoder outputs
train_manifest = 'out/demo/ark_teacher_labels.jsonl'  # the teacher's transcripts
val_manifest = 'data/synth_piper_demo_dev/val.jsonl'  # dev (demo.py builds it)
val_max_utts = 150
eval_batch_size = 32
lowercase = False
cpu_bf16 = True
token_noise = 0.3
batch_size = 16
learning_rate = 1e-4
weight_decay = 0.005
beta2 = 0.95
warmup_iters = 5
max_iters = 160
min_lr = 1e-5
eval_interval = 1000000  # never during training: val WER once, at the end
always_save_checkpoint = True
log_interval = 5
