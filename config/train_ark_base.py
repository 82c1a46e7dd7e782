# Ark-Base, the audio-LLM student's supervised row (python demo.py --rows=ark_base runs this file
# with its own paths and seed; on its own, after that demo run has written its manifest:
# python train.py config/train_ark_base.py, into out/demo/ark_base). Whisper base's frozen
# encoder, an adapter, and a causal LM of 4 blocks from base's decoder layers 0 and 5 (each
# layer's self-attention, then its cross-attention and MLP: student.make_audio_llm), CE on
# transcript + <|im_end|>. The paper's Ark-Base is fully supervised: the demo synthesizes 2,000
# Piper clips of its own (data/synth_piper_ark), Ark-Base trains on the first 1,600 with their
# labels (ark_opd then reads all 2,000 without labels: the same audio and new audio). The fresh
# adapter trains at learning_rate, the LM at a tenth of it (RESULTS.md), the embeddings stay
# frozen.
out_dir = 'out/demo/ark_base'
student = 'audio_llm'
init_from = 'weights/base'
student_layers = 2
lm_lr_scale = 0.1
freeze_embeddings = True
encoder_cache_dir = 'out/demo/encoder_cache'  # the demo's cached base encoder outputs
train_manifest = 'out/demo/ark_labeled.jsonl'  # python demo.py --rows=ark_base writes it
val_manifest = 'data/synth_piper_demo_dev/val.jsonl'  # dev (demo.py builds it)
val_max_utts = 150
eval_batch_size = 32
lowercase = False
cpu_bf16 = True
token_noise = 0.3
batch_size = 16
learning_rate = 3e-3  # the adapter starts from scratch
weight_decay = 0.005
beta2 = 0.95
warmup_iters = 10
max_iters = 800
min_lr = 1e-5
eval_interval = 200
log_interval = 5
