//! WAV to Ogg Opus at the edge: encoding, decoding and waveform previews for
//! push-to-talk voice messages.
