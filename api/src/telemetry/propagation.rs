//! W3C trace context across process boundaries. The plan stream is long-lived, so one stream's
//! gRPC metadata cannot carry a trace per plan: each message carries its own `map<string,string>`
//! carrier instead. Unary calls use the request metadata.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::{OpenTelemetrySpanExt as _, SetParentError};

// These helpers use TraceContextPropagator directly rather than the global propagator: the
// carrier's keys (`traceparent`, `tracestate`) are part of the wire contract between operator and
// agent, and must not depend on whether or how `init` ran in the process.

/// The current span's trace context as W3C `traceparent`/`tracestate` entries, to put into an
/// outgoing plan message. Empty when there is no sampled-or-not OpenTelemetry span (export off).
pub fn inject_current() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier
}

/// Makes `span` a child of the remote span described by `carrier` (from a received message).
///
/// Call it right after creating `span`, before entering it: a span that has started keeps its
/// parent. A carrier without a valid `traceparent` leaves `span` where it is.
pub fn set_parent_from(span: &tracing::Span, carrier: &HashMap<String, String>) {
    set_parent(span, TraceContextPropagator::new().extract(carrier));
}

/// Writes the current span's trace context into outgoing gRPC request metadata.
pub fn inject_metadata(metadata: &mut MetadataMap) {
    TraceContextPropagator::new()
        .inject_context(&tracing::Span::current().context(), &mut MetadataInjector(metadata));
}

/// The remote trace context carried by incoming gRPC request metadata (empty when absent).
pub fn extract_metadata(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// [`set_parent_from`] for a unary call's request metadata.
pub fn set_parent_from_metadata(span: &tracing::Span, metadata: &MetadataMap) {
    set_parent(span, extract_metadata(metadata));
}

fn set_parent(span: &tracing::Span, remote: Context) {
    // An empty context would detach `span` from its local parent; keep that parent instead.
    if !remote.span().span_context().is_valid() {
        return;
    }
    match span.set_parent(remote) {
        Ok(()) => {}
        // A caller bug that silently splits the trace: make it visible.
        Err(SetParentError::AlreadyStarted) => {
            tracing::warn!("span already started; remote trace parent ignored");
        }
        // No OpenTelemetry layer (export off) or the span is filtered out: nothing to link.
        Err(SetParentError::LayerNotFound | SetParentError::SpanDisabled) => {}
    }
}

/// Writes propagation fields as ASCII metadata; entries that are not valid metadata are skipped
/// (W3C values are always valid).
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str()))
        {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Runs `f` under a subscriber whose spans go to a real SDK tracer provider (through the same
    /// layer `init` installs) and returns the finished spans.
    fn with_tracing(f: impl FnOnce()) -> Vec<SpanData> {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let subscriber =
            tracing_subscriber::registry().with(super::super::otel_layer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f);
        provider.force_flush().expect("flush to the in-memory exporter");
        exporter.get_finished_spans().expect("read the in-memory exporter")
    }

    fn span_named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
        spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("span {name} not exported: {spans:?}"))
    }

    fn current_ids(span: &tracing::Span) -> (TraceId, SpanId) {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        (sc.trace_id(), sc.span_id())
    }

    #[test]
    fn carrier_round_trip_makes_the_receiver_a_child_of_the_sender() {
        let mut sent = (TraceId::INVALID, SpanId::INVALID);
        let mut carrier = HashMap::new();
        let spans = with_tracing(|| {
            let sender = tracing::info_span!("send_plan");
            sender.in_scope(|| {
                carrier = inject_current();
                sent = current_ids(&tracing::Span::current());
            });
            drop(sender);

            // A new root, as on the agent side where no local span encloses the message.
            let receiver = tracing::info_span!(parent: None, "apply_plan");
            set_parent_from(&receiver, &carrier);
            assert_eq!(current_ids(&receiver).0, sent.0);
            receiver.in_scope(|| tracing::info_span!("write_rules").in_scope(|| {}));
        });

        assert!(carrier.contains_key("traceparent"), "{carrier:?}");
        assert_ne!(sent.0, TraceId::INVALID);
        let apply = span_named(&spans, "apply_plan");
        assert_eq!(apply.span_context.trace_id(), sent.0);
        assert_eq!(apply.parent_span_id, sent.1);
        assert!(apply.parent_span_is_remote);
        let write = span_named(&spans, "write_rules");
        assert_eq!(write.span_context.trace_id(), sent.0);
        assert_eq!(write.parent_span_id, apply.span_context.span_id());
    }

    #[test]
    fn an_empty_carrier_keeps_the_local_parent() {
        let spans = with_tracing(|| {
            tracing::info_span!("outer").in_scope(|| {
                let inner = tracing::info_span!("inner");
                set_parent_from(&inner, &HashMap::new());
                inner.in_scope(|| {});
            });
        });
        let outer = span_named(&spans, "outer");
        let inner = span_named(&spans, "inner");
        assert_eq!(inner.parent_span_id, outer.span_context.span_id());
        assert_eq!(inner.span_context.trace_id(), outer.span_context.trace_id());
    }

    #[test]
    fn metadata_round_trip_carries_the_trace() {
        let mut sent = TraceId::INVALID;
        let mut metadata = MetadataMap::new();
        let spans = with_tracing(|| {
            tracing::info_span!("client_call").in_scope(|| {
                inject_metadata(&mut metadata);
                sent = current_ids(&tracing::Span::current()).0;
            });
            assert_eq!(extract_metadata(&metadata).span().span_context().trace_id(), sent);
            let handler = tracing::info_span!(parent: None, "handle_call");
            set_parent_from_metadata(&handler, &metadata);
            handler.in_scope(|| {});
        });
        assert!(metadata.get("traceparent").is_some());
        assert_eq!(span_named(&spans, "handle_call").span_context.trace_id(), sent);
    }

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_injected_and_nothing_panics() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("plain");
            let carrier = span.in_scope(inject_current);
            assert!(carrier.is_empty());
            let mut foreign = HashMap::new();
            foreign.insert(
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            );
            set_parent_from(&span, &foreign);
        });
    }
}
