# The demo's opd row (python demo.py --rows=opd runs this file with its own paths and seed; its
# td_opd row runs it from td's checkpoint instead of base's). Teacher: Whisper base, frozen.
# Student: the demo's base row (base's frozen encoder + 2 decoder layers, SFT on the 80 labeled
# Piper clips). The paper's top-k union forward KL on greedy rollouts of the 320 unlabeled clips;
# every setting chosen on dev (RESULTS.md, "The natural-voice demo"). On its own, after
# python demo.py --rows=base:
#   python distill.py config/distill_demo_opd.py
out_dir = 'out/demo_opd'
teacher_path = 'weights/base'
init_from = 'out/demo/base/ckpt.pt'
encoder_cache_dir = 'out/demo/encoder_cache'  # the demo's cached encoder outputs
train_manifest = 'out/demo/unlabeled.jsonl'  # audio only: no transcripts
val_manifest = 'data/synth_piper_demo_dev/val.jsonl'  # dev (demo.py builds it)
val_max_utts = 150
loss = 'topk_union'
topk = 32
temperature = 0.0  # greedy rollouts, as in the paper
ngram_stop = 4  # anti-loop: cut a rollout where a 4-gram repeats ...
loop_unlikelihood = 3.0  # ... and train that 4-gram away (-log(1 - p)) instead of toward the teacher
batch_size = 16
learning_rate = 3e-4
warmup_iters = 5
max_iters = 100
min_lr = 1e-5
eval_interval = 0  # val WER at the end; the last weights are kept
always_save_checkpoint = True
log_interval = 5
