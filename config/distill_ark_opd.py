# The demo's ark_opd row (python demo.py --rows=ark_opd runs this file with its own paths and
# seed; on its own, after python demo.py --rows=ark_base: python distill.py
# config/distill_ark_opd.py, into out/demo/ark_opd like the demo's seed 1337). OPD through text
# (distill.opd_step_text) from Whisper base into the Ark-Base student, on Ark-Base's 1,600 clips
# without their labels and 400 new ones: greedy rollouts, decoded, re-tokenized by base's tokenizer
# under its own prompt, the top-k union forward KL on the mapped ids.
out_dir = 'out/demo/ark_opd'
teacher_path = 'weights/base'
init_from = 'out/demo/ark_base/ckpt.pt'
encoder_cache_dir = 'out/demo/encoder_cache'
train_manifest = 'out/demo/ark_unlabeled.jsonl'  # audio only: no transcripts
val_manifest = 'data/synth_piper_demo_dev/val.jsonl'  # dev (demo.py builds it)
val_max_utts = 150
loss = 'topk_union'  # the text route takes this loss only
topk = 32
temperature = 0.0
ngram_stop = 4  # anti-loop: cut a rollout where a 4-gram repeats ...
loop_unlikelihood = 3.0  # ... and train that 4-gram away (without: dev WER 64.68% -> 115.37%)
batch_size = 16
learning_rate = 1e-4
warmup_iters = 5
max_iters = 160  # more steps did better on dev (RESULTS.md); the demo's 30 minutes cap them
min_lr = 1e-5
eval_interval = 0
always_save_checkpoint = True
log_interval = 5
