# The demo's opd_pure row (python demo.py --rows=opd_pure): opd's recipe without the anti-loop
# measures, the paper's loss alone (the top-k union forward KL on greedy rollouts), so that the
# table shows what the anti-loop pair adds. The same student, audio, budget and rate as opd.
#   python distill.py config/distill_demo_opd_pure.py
out_dir = 'out/demo_opd_pure'
teacher_path = 'weights/base'
init_from = 'out/demo/base/ckpt.pt'
encoder_cache_dir = 'out/demo/encoder_cache'  # the demo's cached encoder outputs
train_manifest = 'out/demo/unlabeled.jsonl'  # audio only: no transcripts
val_manifest = 'data/synth_piper_demo_dev/val.jsonl'  # dev (demo.py builds it)
val_max_utts = 150
loss = 'topk_union'
topk = 32
temperature = 0.0  # greedy rollouts, as in the paper
ngram_stop = 0  # no anti-loop measures
loop_unlikelihood = 0.0
batch_size = 16
learning_rate = 3e-4
warmup_iters = 5
max_iters = 100
min_lr = 1e-5
eval_interval = 0  # val WER at the end; the last weights are kept
always_save_checkpoint = True
log_interval = 5
