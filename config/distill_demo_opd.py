# The demo's opd row on its own (run `python demo.py --rows=base` first): teacher Whisper base (frozen); student = base's
# encoder (frozen, shared: its outputs are computed once per utterance and cached) + a 2-layer decoder initialised from
# the teacher's first and last decoder layers, SFT'd as the demo's base row. Loss: the paper's top-k union forward KL on
# greedy rollouts, on the demo's 1,000 unlabeled clips (their manifest has no transcripts). Only the decoder layers train.
out_dir = 'out/demo_opd'
teacher_path = 'weights/base'
init_from = 'out/demo/base/ckpt.pt'  # 'teacher' = make_student(teacher, student_layers) without the base-row training
student_layers = 2
freeze_encoder = True
freeze_embeddings = True
encoder_cache_dir = 'out/demo/encoder_cache'  # float16 on disk: later runs and rows skip base's encoder (~0.3 s/utt here)
train_manifest = 'out/demo/unlabeled.jsonl'
val_manifest = 'data/synth_fortunes/val.jsonl'
val_max_utts = 50
mode = 'opd'
loss = 'topk_union'
topk = 32
temperature = 0.0  # greedy rollouts, as in the paper
ngram_stop = 4  # cut a looping rollout where a 4-gram repeats
loop_unlikelihood = 3.0  # ... and train that 4-gram's tokens away (-log(1 - p)) instead of toward the teacher
batch_size = 16
learning_rate = 1e-4
warmup_iters = 5
max_iters = 110
min_lr = 1e-5
eval_interval = 25
log_interval = 5
