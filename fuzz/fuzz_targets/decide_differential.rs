//! The compiled decision tree against the plain IR interpreter, on the example
//! policies with fuzzed tenants and request bodies. Also checks the product's
//! promise: every attempt is a model the constraints allow.
#![no_main]
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use routeplane::compile::CompiledPolicy;
use routeplane::decide::{decide, reference, NoStats, RequestFeatures};
use routeplane::ir::{Endpoint, Type, Value};
use routeplane::source::Sources;

fn policies() -> &'static [CompiledPolicy] {
    static P: OnceLock<Vec<CompiledPolicy>> = OnceLock::new();
    P.get_or_init(|| {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
        let dirs = routeplane::load::discover(&[root.into()]).expect("example policies");
        dirs.into_iter()
            .map(|d| {
                let mut s = Sources::new();
                for (_, f) in d.sources.iter() {
                    s.add(f.name.clone(), f.text.clone());
                }
                routeplane::compile::compile(&s).unwrap_or_else(|a| panic!("example does not compile: {:?}", a.diagnostics))
            })
            .collect()
    })
}

fn value(ty: &Type, u: &mut Unstructured) -> arbitrary::Result<Option<Value>> {
    if bool::arbitrary(u)? {
        return Ok(None);
    }
    Ok(Some(match ty {
        Type::Bool => Value::Bool(bool::arbitrary(u)?),
        Type::Number => Value::Number(f64::from(u16::arbitrary(u)?)),
        Type::String => Value::Str(String::arbitrary(u)?),
        Type::Enum(v) => Value::Enum(u.choose_index(v.len().max(1))? as u32),
        Type::List(inner) => Value::List(value(inner, u)?.into_iter().collect()),
    }))
}

fn run(u: &mut Unstructured) -> arbitrary::Result<()> {
    let all = policies();
    let p = &all[u.choose_index(all.len())?];
    let values = p.policy().tenant_attrs.iter().map(|a| value(&a.ty, u)).collect::<arbitrary::Result<Vec<_>>>()?;
    let tenant = p.tenant_from_values("fuzz", values.clone());
    let endpoint = *u.choose(&[Endpoint::Chat, Endpoint::Embeddings, Endpoint::Images, Endpoint::AudioTranscription, Endpoint::AudioSpeech])?;
    let body: String = String::arbitrary(u)?;
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    let mut req = RequestFeatures::from_openai_json(endpoint, &json);
    if bool::arbitrary(u)? {
        let names: Vec<&str> = p.policy().models.iter().map(|m| m.name.as_str()).chain(p.policy().intents.iter().map(|i| i.name.as_str())).collect();
        if !names.is_empty() {
            req.model = Some(names[u.choose_index(names.len())?].to_string());
        }
    }
    if bool::arbitrary(u)? {
        req.feature = Some(String::arbitrary(u)?);
    }
    let fast = decide(p, &tenant, &req, &NoStats);
    let slow = reference::decide(p, "fuzz", &values, &req, &NoStats);
    assert_eq!(fast, slow, "compiled and reference decisions differ for {req:?}");
    for m in &fast.attempts {
        assert!(tenant.allowed().contains(*m), "attempt {m:?} is outside the tenant's allowed set");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
