//! Feature extraction from any JSON body, for every endpoint: never panics,
//! and the estimate is bounded by the body's size. Splicing the model into
//! the body's bytes changes nothing else an upstream reads.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routeplane::decide::RequestFeatures;
use routeplane::gateway::providers::body::JsonBody;
use routeplane::ir::Endpoint;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    for endpoint in [Endpoint::Chat, Endpoint::Embeddings, Endpoint::Images, Endpoint::AudioTranscription, Endpoint::AudioSpeech] {
        let f = RequestFeatures::from_openai_json(endpoint, &json);
        assert!(f.input_tokens <= data.len() as u64 + 16, "estimate {} for {} bytes", f.input_tokens, data.len());
    }
    let Ok(body) = JsonBody::new(bytes::Bytes::copy_from_slice(data), json.clone()) else { return };
    let spliced: serde_json::Value = serde_json::from_slice(&body.with_model("fuzzed")).expect("spliced body is JSON");
    let mut expected = json;
    expected["model"] = "fuzzed".into();
    assert_eq!(spliced, expected);
});
