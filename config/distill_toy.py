# OPD between two models trained from scratch on the synthetic grammar corpus by train.py (placeholders: point them at
# your runs): a big teacher and a small student that share the teacher's SentencePiece tokenizer.
out_dir = 'out/toy_opd'
teacher_path = 'out/grammar_teacher/ckpt.pt'
init_from = 'out/grammar_student/ckpt.pt'
freeze_encoder = False  # the student's own encoder trains too
train_manifest = 'data/synth_grammar/train.jsonl'
val_manifest = 'data/synth_grammar/val.jsonl'
mode = 'opd'
loss = 'topk_union'
topk = 32
tokens_per_second = 8.0  # small SentencePiece vocabularies cut words into more pieces than Whisper's BPE
batch_size = 32
learning_rate = 3e-4
warmup_iters = 20
max_iters = 500
min_lr = 3e-5
eval_interval = 100
