# Distill a smaller Whisper on your own recordings, no transcripts needed (README, "Distill on your
# own audio"). First cut the folder into clips:
#   python adapt.py segment my_audio data/my_audio
# then run the recipe (TD on Whisper base's transcripts, then OPD on the rest of the audio; the
# student that agrees best with the teacher on 40 held-out clips, exported):
#   python adapt.py config/adapt_my_audio.py
manifest = 'data/my_audio/manifest.jsonl'
teacher = 'weights/base'
out_dir = 'out/my_audio'
labeled_manifest = ''  # a few clips you transcribed: the best weights by their WER instead
held_out = 40
td_iters = 200
opd_iters = 100
