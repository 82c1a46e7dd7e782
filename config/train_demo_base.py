# The demo's base row (python demo.py --rows=base runs this file with its own paths and seed): the
# student. Whisper base's frozen encoder + a 2-layer decoder (base's decoder layers 0 and 5:
# student.make_student), SFT on the 80 Piper clips that keep their labels. It overfits fast:
# dropout, token noise, and the weights with the best dev WER (eval every 50 steps). On its own,
# after a demo run has written the labeled manifest and the encoder cache:
#   python train.py config/train_demo_base.py
out_dir = 'out/demo_base'
init_from = 'weights/base'
student_layers = 2
freeze_embeddings = True  # token (= tied output) and position embeddings stay the teacher's
encoder_cache_dir = 'out/demo/encoder_cache'  # the demo's cached base encoder outputs
train_manifest = 'out/demo/labeled.jsonl'  # the 80 labeled clips (demo.py writes it)
val_manifest = 'data/synth_piper_demo_dev/val.jsonl'  # dev (demo.py builds it)
val_max_utts = 150
eval_batch_size = 32
lowercase = False
cpu_bf16 = True
token_noise = 0.3  # swap 30% of the transcript tokens the decoder reads (against greedy loops)
dropout = 0.1
batch_size = 8
learning_rate = 2e-4
weight_decay = 0.005
beta2 = 0.95
warmup_iters = 10
max_iters = 400
min_lr = 1e-5
eval_interval = 50  # 8 dev scorings: each run's best step was a multiple of 50 (RESULTS.md)
log_interval = 5
