# The longer recipe: the demo's base row (2-layer decoder, SFT on its 80 labeled clips) distilled
# from Whisper base by OPD on 1,600 more unlabeled Piper clips, aiming at Whisper tiny.en on the
# natural-voice test. No labels beyond base's 80: distill.py reads only the audio of
# train_manifest. Before it (README, "The longer recipe"):
#   python demo.py --rows=base        # base, the corpus and the encoder cache
#   python synth.py --out=data/synth_piper_long --text=fortunes --voices=piper --n_train=1600 \
#       --n_val=40 --n_test=150       # the same dev/test sentences as the demo's, none in train
#                                     # (the same audio as the first 1,600 of the demo's ark rows)
# then: python distill.py config/distill_long_opd.py
#       python bench.py versus --ckpt=out/long_opd/ckpt.pt --ref=weights/tiny.en \
#           --manifest=data/synth_piper/test.jsonl
# Every setting is the demo's dev choice (lr 3e-4, batch 16, the anti-loop pair), over 8x the
# updates; the run keeps the weights with the best dev WER.
out_dir = 'out/long_opd'
teacher_path = 'weights/base'
init_from = 'out/demo/base/ckpt.pt'
encoder_cache_dir = 'out/demo/encoder_cache'
train_manifest = 'data/synth_piper_long/train.jsonl'  # 1,600 Piper clips, none of dev's or test's
val_manifest = 'data/synth_piper/val.jsonl'  # dev
val_max_utts = 40
loss = 'topk_union'
topk = 32
temperature = 0.0
ngram_stop = 4
loop_unlikelihood = 3.0
batch_size = 16
learning_rate = 3e-4
warmup_iters = 20
max_iters = 800
min_lr = 1e-5
eval_interval = 100
log_interval = 10
