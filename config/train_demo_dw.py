# The demo's dw row (python demo.py --rows=dw runs this file with its own paths and seed): what a
# Whisper user runs today to get a small student, distil-whisper's objective, on the same student,
# audio and budget as opd: base, trained on Whisper base's greedy transcripts of the 320 unlabeled
# clips (demo.py writes them to out/demo/teacher_labels.jsonl, as for td) with 0.8 x their
# cross-entropy + 1.0 x KL(p_T || p_S) x tau^2 at tau = 2 on the teacher's logits along them
# (distil-whisper's training script's defaults); 100 updates of 16 at td's rate, the last
# weights. The off-policy counterpart of OPD: the teacher's transcripts, not the student's.
out_dir = 'out/demo_dw'
init_from = 'out/demo/base/ckpt.pt'
teacher_path = 'weights/base'
kl_weight = 1.0
kl_tau = 2.0
encoder_cache_dir = 'out/demo/encoder_cache'  # the demo's cached base encoder outputs
train_manifest = 'out/demo/dw/teacher_labels.jsonl'  # the teacher's transcripts
val_manifest = 'data/synth_piper_demo_dev/val.jsonl'  # dev (demo.py builds it)
val_max_utts = 150
eval_batch_size = 32
lowercase = False
cpu_bf16 = True
batch_size = 16
learning_rate = 3e-4
weight_decay = 0.005
beta2 = 0.95
warmup_iters = 5
max_iters = 100
min_lr = 1e-5
eval_interval = 1000000  # never during training: val WER once, at the end
always_save_checkpoint = True
log_interval = 5
