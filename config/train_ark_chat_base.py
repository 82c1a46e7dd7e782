# Ark-Base on a pretrained chat LLM, the paper's student shape for real (README, "Two student
# families"): Whisper base's frozen encoder -> a fresh adapter -> SmolLM2-135M-Instruct (its 30
# blocks, its 49,152-token BPE plus 3 audio tokens, a ChatML prompt), CE on the transcript and
# <|im_end|>. The dev probe set (150 dev clips, 600 train; sentences none of the demo's corpora use):
#   python synth.py --out=data/synth_piper_dev --text=fortunes --voices=piper --n_train=600 \
#       --n_val=150 --n_test=0 --skip=2190 --seed=1337
#   python train.py config/train_ark_chat_base.py
# The fresh adapter trains at learning_rate, the LM at a tenth of it, its embeddings frozen (the
# split that made the Whisper-built LM learn; the paper trains every parameter at one rate).
out_dir = 'out/ark_chat/base'
student = 'chat_llm'
llm = 'smollm2'
init_from = 'weights/base'
student_layers = 30
lm_lr_scale = 0.1
freeze_embeddings = True
encoder_cache_dir = 'out/ark_chat/encoder_cache'
train_manifest = 'data/synth_piper_dev/train.jsonl'
val_manifest = 'data/synth_piper_dev/val.jsonl'
val_max_utts = 150
eval_batch_size = 32
lowercase = False
cpu_bf16 = True
batch_size = 16
learning_rate = 1e-3
weight_decay = 0.005
beta2 = 0.95
warmup_iters = 10
max_iters = 200
min_lr = 1e-5
eval_interval = 100
log_interval = 5
