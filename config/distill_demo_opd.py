# The demo's OPD row: teacher Whisper base (frozen); student = base's encoder (frozen, shared: its outputs are computed
# once per utterance and cached) + a 2-layer decoder initialised from the teacher's first and last decoder layers, then
# trained as the demo's `base` row (init_from). Loss: the paper's top-k union forward KL on greedy rollouts, no labels.
out_dir = 'out/demo_opd'
teacher_path = 'weights/base'
init_from = 'out/demo_base/ckpt.pt'  # 'teacher' = make_student(teacher, student_layers) without the base-row training
student_layers = 2
freeze_encoder = True
encoder_cache_dir = 'out/encoder_cache/base'  # float16 on disk: later runs and rows skip base's encoder (~0.9 s/utt on 2 cores)
train_manifest = 'data/synth_grammar/train.jsonl'  # transcripts are not read
val_manifest = 'data/synth_grammar/val.jsonl'
val_max_utts = 100
mode = 'opd'
loss = 'topk_union'
topk = 32
temperature = 0.0  # greedy rollouts, as in the paper
max_new_tokens = 64
batch_size = 16
learning_rate = 1e-4
warmup_iters = 20
max_iters = 300
min_lr = 1e-5
eval_interval = 100
log_interval = 10
