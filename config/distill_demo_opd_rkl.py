# The demo's opd_rkl row (python demo.py --rows=opd_rkl runs this file with its own paths and
# seed): config/distill_demo_opd.py with another objective, everything else equal so the two rows
# compare on the same terms. Full-vocabulary reverse KL (GKD with beta = 1) on rollouts sampled at
# temperature 1, with opd's anti-loop pair. On its own, after python demo.py --rows=base:
#   python distill.py config/distill_demo_opd_rkl.py
out_dir = 'out/demo_opd_rkl'
teacher_path = 'weights/base'
init_from = 'out/demo/base/ckpt.pt'
encoder_cache_dir = 'out/demo/encoder_cache'  # the demo's cached encoder outputs
train_manifest = 'out/demo/unlabeled.jsonl'  # audio only: no transcripts
val_manifest = 'data/synth_piper_demo_dev/val.jsonl'  # dev (demo.py builds it)
val_max_utts = 150
loss = 'rkl'
topk = 32  # not in the loss: VUSS, the support overlap in log.jsonl
temperature = 1.0  # sampled rollouts
ngram_stop = 4  # anti-loop: cut a rollout where a 4-gram repeats ...
loop_unlikelihood = 3.0  # ... and train that 4-gram away (-log(1 - p)), not toward the teacher
batch_size = 16
learning_rate = 3e-4
warmup_iters = 5
max_iters = 100
min_lr = 1e-5
eval_interval = 0  # val WER at the end; the last weights are kept
always_save_checkpoint = True
log_interval = 5
