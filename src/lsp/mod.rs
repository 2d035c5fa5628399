//! `routeplane lsp`: the language server, over stdio.
//!
//! The server runs the same [`analyze`](crate::analysis::analyze) as
//! `routeplane check`, over every `.route` file of the policy directory that
//! holds the edited file (open buffers override the disk), so a mistake in
//! one file that breaks another shows in both.
//!
//! Robustness: every request handler runs under `catch_unwind`; a panic
//! answers that request with an error and the server keeps serving.
//! Half-typed input is normal: the analysis always returns what parsed, and
//! completion also offers names from the last analysis without syntax errors.

mod code_action;
mod completion;
pub mod convert;
mod hover;
pub mod index;
mod navigate;
mod symbols;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lsp_server::{Connection, Message, Notification, Request, RequestId, Response};
use lsp_types as lsp;
use lsp_types::notification::Notification as _;
use lsp_types::request::Request as _;

use crate::analysis::{analyze, Analysis};
use crate::source::{FileId, SourceFile, Sources};
use convert::Encoding;
use index::Index;

/// The analysis of one policy directory.
pub struct PolicyView {
    pub sources: Sources,
    /// Path of each file id.
    pub paths: Vec<PathBuf>,
    pub analysis: Analysis,
    pub index: Index,
}

impl PolicyView {
    pub fn file_id(&self, path: &Path) -> Option<FileId> {
        self.paths
            .iter()
            .position(|p| p == path)
            .map(|i| FileId(i as u32))
    }
    pub fn file(&self, id: FileId) -> Option<&SourceFile> {
        self.sources.get(id)
    }
    pub fn path(&self, id: FileId) -> Option<&Path> {
        self.paths.get(id.0 as usize).map(PathBuf::as_path)
    }
    pub fn uri(&self, id: FileId) -> Option<lsp::Uri> {
        self.path(id).and_then(path_to_uri)
    }
}

pub struct Server {
    /// Open documents: path -> text.
    docs: HashMap<PathBuf, String>,
    /// Latest analysis per policy directory.
    views: HashMap<PathBuf, PolicyView>,
    /// Symbol names of the last analysis without syntax errors, per directory, for completion.
    last_good_names: HashMap<PathBuf, Vec<(index::SymbolKind, String)>>,
    /// Files we published diagnostics for, per directory, so fixed files get cleared.
    published: HashMap<PathBuf, Vec<PathBuf>>,
    pub encoding: Encoding,
}

/// Run the server on stdin/stdout until the client says `exit`.
pub fn run_stdio() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (connection, io_threads) = Connection::stdio();
    let (id, params) = connection.initialize_start()?;
    let params: lsp::InitializeParams = serde_json::from_value(params)?;
    let utf8 = params
        .capabilities
        .general
        .as_ref()
        .and_then(|g| g.position_encodings.as_ref())
        .is_some_and(|encs| encs.contains(&lsp::PositionEncodingKind::UTF8));
    let encoding = if utf8 {
        Encoding::Utf8
    } else {
        Encoding::Utf16
    };
    let result = lsp::InitializeResult {
        capabilities: capabilities(encoding),
        server_info: Some(lsp::ServerInfo {
            name: "routeplane".into(),
            version: Some(env!("CARGO_PKG_VERSION").into()),
        }),
    };
    connection.initialize_finish(id, serde_json::to_value(result)?)?;
    let mut server = Server {
        docs: HashMap::new(),
        views: HashMap::new(),
        last_good_names: HashMap::new(),
        published: HashMap::new(),
        encoding,
    };
    server.main_loop(&connection)?;
    drop(connection);
    io_threads.join()?;
    Ok(())
}

fn capabilities(encoding: Encoding) -> lsp::ServerCapabilities {
    lsp::ServerCapabilities {
        position_encoding: Some(match encoding {
            Encoding::Utf8 => lsp::PositionEncodingKind::UTF8,
            Encoding::Utf16 => lsp::PositionEncodingKind::UTF16,
        }),
        text_document_sync: Some(lsp::TextDocumentSyncCapability::Options(
            lsp::TextDocumentSyncOptions {
                open_close: Some(true),
                change: Some(lsp::TextDocumentSyncKind::FULL),
                save: Some(lsp::TextDocumentSyncSaveOptions::Supported(true)),
                ..Default::default()
            },
        )),
        hover_provider: Some(lsp::HoverProviderCapability::Simple(true)),
        definition_provider: Some(lsp::OneOf::Left(true)),
        references_provider: Some(lsp::OneOf::Left(true)),
        rename_provider: Some(lsp::OneOf::Right(lsp::RenameOptions {
            prepare_provider: Some(true),
            work_done_progress_options: Default::default(),
        })),
        completion_provider: Some(lsp::CompletionOptions {
            trigger_characters: Some(vec![".".into(), " ".into(), "[".into()]),
            ..Default::default()
        }),
        document_formatting_provider: Some(lsp::OneOf::Left(true)),
        document_symbol_provider: Some(lsp::OneOf::Left(true)),
        code_action_provider: Some(lsp::CodeActionProviderCapability::Simple(true)),
        ..Default::default()
    }
}

impl Server {
    fn main_loop(
        &mut self,
        conn: &Connection,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut queue: Vec<Message> = Vec::new();
        loop {
            let msg = match queue.pop() {
                Some(m) => m,
                None => match conn.receiver.recv() {
                    Ok(m) => m,
                    Err(_) => return Ok(()),
                },
            };
            match msg {
                Message::Request(req) => {
                    if conn.handle_shutdown(&req)? {
                        return Ok(());
                    }
                    let resp = self.handle_request(req);
                    conn.sender.send(Message::Response(resp))?;
                }
                Message::Notification(note) => {
                    let mut dirty = self.apply_notification(note);
                    // Coalesce a burst of edits: apply every change already queued
                    // before analysing once; keep other messages, in order, for after.
                    let mut later = Vec::new();
                    while let Ok(next) = conn.receiver.try_recv() {
                        match next {
                            Message::Notification(n) if is_text_sync(&n.method) => {
                                dirty.extend(self.apply_notification(n));
                            }
                            other => later.push(other),
                        }
                    }
                    dirty.sort();
                    dirty.dedup();
                    for dir in dirty {
                        self.reanalyze(&dir);
                        self.publish(conn, &dir)?;
                    }
                    // `queue` is a stack: push in reverse so the oldest comes out first.
                    queue.extend(later.into_iter().rev());
                }
                Message::Response(_) => {}
            }
        }
    }

    /// Apply a notification; returns the policy directories to re-analyse.
    fn apply_notification(&mut self, note: Notification) -> Vec<PathBuf> {
        let path_of = |uri: &lsp::Uri| uri_to_path(uri);
        match note.method.as_str() {
            lsp::notification::DidOpenTextDocument::METHOD => {
                if let Ok(p) = serde_json::from_value::<lsp::DidOpenTextDocumentParams>(note.params)
                {
                    if let Some(path) = path_of(&p.text_document.uri) {
                        self.docs.insert(path.clone(), p.text_document.text);
                        return vec![policy_dir(&path)];
                    }
                }
            }
            lsp::notification::DidChangeTextDocument::METHOD => {
                if let Ok(p) =
                    serde_json::from_value::<lsp::DidChangeTextDocumentParams>(note.params)
                {
                    if let (Some(path), Some(change)) = (
                        path_of(&p.text_document.uri),
                        p.content_changes.into_iter().last(),
                    ) {
                        self.docs.insert(path.clone(), change.text);
                        return vec![policy_dir(&path)];
                    }
                }
            }
            lsp::notification::DidSaveTextDocument::METHOD => {
                if let Ok(p) = serde_json::from_value::<lsp::DidSaveTextDocumentParams>(note.params)
                {
                    if let Some(path) = path_of(&p.text_document.uri) {
                        if let Some(text) = p.text {
                            self.docs.insert(path.clone(), text);
                        }
                        return vec![policy_dir(&path)];
                    }
                }
            }
            lsp::notification::DidCloseTextDocument::METHOD => {
                if let Ok(p) =
                    serde_json::from_value::<lsp::DidCloseTextDocumentParams>(note.params)
                {
                    if let Some(path) = path_of(&p.text_document.uri) {
                        self.docs.remove(&path);
                        return vec![policy_dir(&path)];
                    }
                }
            }
            _ => {}
        }
        Vec::new()
    }

    /// Analyse the policy in `dir`: the `.route` files on disk, overridden by open buffers.
    pub fn reanalyze(&mut self, dir: &Path) {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "route"))
                    .collect()
            })
            .unwrap_or_default();
        for open in self.docs.keys() {
            if policy_dir(open) == dir && !paths.contains(open) {
                paths.push(open.clone());
            }
        }
        paths.sort();
        let mut sources = Sources::new();
        let mut kept = Vec::new();
        for p in paths {
            let text = match self.docs.get(&p) {
                Some(t) => t.clone(),
                None => match std::fs::read(&p) {
                    Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    Err(_) => continue,
                },
            };
            sources.add(p.display().to_string(), text);
            kept.push(p);
        }
        let analysis = analyze(&sources);
        let index = Index::build(&analysis.files);
        if !analysis
            .diagnostics
            .iter()
            .any(|d| d.code == "route::syntax")
        {
            let names = index.symbols.keys().cloned().collect();
            self.last_good_names.insert(dir.to_path_buf(), names);
        }
        self.views.insert(
            dir.to_path_buf(),
            PolicyView {
                sources,
                paths: kept,
                analysis,
                index,
            },
        );
    }

    fn publish(
        &mut self,
        conn: &Connection,
        dir: &Path,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(view) = self.views.get(dir) else {
            return Ok(());
        };
        let enc = self.encoding;
        let uri_of = |id: FileId| Some((view.uri(id)?, view.file(id)?));
        let mut per_file: HashMap<PathBuf, Vec<lsp::Diagnostic>> = HashMap::new();
        for p in &view.paths {
            per_file.insert(p.clone(), Vec::new());
        }
        for d in &view.analysis.diagnostics {
            let Some(span) = d.span() else { continue };
            let (Some(file), Some(path)) = (view.file(span.file), view.path(span.file)) else {
                continue;
            };
            if let Some(ld) = convert::diagnostic(d, file, enc, &uri_of) {
                per_file.entry(path.to_path_buf()).or_default().push(ld);
            }
        }
        // Clear files that no longer belong to the policy (deleted or closed buffers).
        for old in self.published.get(dir).into_iter().flatten() {
            per_file.entry(old.clone()).or_default();
        }
        self.published.insert(dir.to_path_buf(), view.paths.clone());
        for (path, diagnostics) in per_file {
            let Some(uri) = path_to_uri(&path) else {
                continue;
            };
            let params = lsp::PublishDiagnosticsParams {
                uri,
                diagnostics,
                version: None,
            };
            let note =
                Notification::new(lsp::notification::PublishDiagnostics::METHOD.into(), params);
            conn.sender.send(Message::Notification(note))?;
        }
        Ok(())
    }

    /// The analysis of the policy holding `uri`, computing it if needed.
    pub fn view_for(&mut self, uri: &lsp::Uri) -> Option<(&PolicyView, FileId)> {
        let path = uri_to_path(uri)?;
        let dir = policy_dir(&path);
        if !self.views.contains_key(&dir) {
            self.reanalyze(&dir);
        }
        let view = self.views.get(&dir)?;
        let id = view.file_id(&path)?;
        Some((view, id))
    }

    pub fn last_good_names(&self, uri: &lsp::Uri) -> &[(index::SymbolKind, String)] {
        uri_to_path(uri)
            .and_then(|p| self.last_good_names.get(&policy_dir(&p)))
            .map_or(&[], Vec::as_slice)
    }

    fn handle_request(&mut self, req: Request) -> Response {
        let id = req.id.clone();
        let method = req.method.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.dispatch(req)));
        match outcome {
            Ok(Ok(value)) => Response {
                id,
                result: Some(value),
                error: None,
            },
            Ok(Err(message)) => {
                error_response(id, lsp_server::ErrorCode::InvalidParams as i32, message)
            }
            Err(_) => error_response(
                id,
                lsp_server::ErrorCode::InternalError as i32,
                format!("internal error while handling `{method}`; the server keeps running"),
            ),
        }
    }

    fn dispatch(&mut self, req: Request) -> Result<serde_json::Value, String> {
        fn params<T: serde::de::DeserializeOwned>(req: lsp_server::Request) -> Result<T, String> {
            serde_json::from_value(req.params).map_err(|e| format!("invalid params: {e}"))
        }
        fn json<T: serde::Serialize>(v: T) -> Result<serde_json::Value, String> {
            serde_json::to_value(v).map_err(|e| e.to_string())
        }
        use lsp::request::{
            CodeActionRequest, Completion, DocumentSymbolRequest, Formatting, GotoDefinition,
            HoverRequest, PrepareRenameRequest, References, Rename,
        };
        match req.method.as_str() {
            HoverRequest::METHOD => json(hover::hover(self, params(req)?)),
            GotoDefinition::METHOD => json(navigate::definition(self, params(req)?)),
            References::METHOD => json(navigate::references(self, params(req)?)),
            PrepareRenameRequest::METHOD => json(navigate::prepare_rename(self, params(req)?)),
            Rename::METHOD => json(navigate::rename(self, params(req)?)?),
            Completion::METHOD => json(completion::completion(self, params(req)?)),
            DocumentSymbolRequest::METHOD => json(symbols::document_symbols(self, params(req)?)),
            Formatting::METHOD => json(symbols::formatting(self, params(req)?)),
            CodeActionRequest::METHOD => json(code_action::code_actions(self, params(req)?)),
            other => Err(format!("method `{other}` is not supported")),
        }
    }
}

fn error_response(id: RequestId, code: i32, message: String) -> Response {
    Response {
        id,
        result: None,
        error: Some(lsp_server::ResponseError {
            code,
            message,
            data: None,
        }),
    }
}

fn is_text_sync(method: &str) -> bool {
    use lsp::notification::*;
    [
        DidOpenTextDocument::METHOD,
        DidChangeTextDocument::METHOD,
        DidSaveTextDocument::METHOD,
        DidCloseTextDocument::METHOD,
    ]
    .contains(&method)
}

fn policy_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `file:///a%20b/c.route` -> `/a b/c.route`. Other schemes are not policies on disk.
pub fn uri_to_path(uri: &lsp::Uri) -> Option<PathBuf> {
    let s = uri.as_str();
    let rest = s.strip_prefix("file://")?;
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = rest
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    Some(PathBuf::from(String::from_utf8(out).ok()?))
}

pub fn path_to_uri(path: &Path) -> Option<lsp::Uri> {
    let mut s = String::from("file://");
    for b in path.to_str()?.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_and_paths_round_trip() {
        let p = PathBuf::from("/tmp/a b/ünï.route");
        let uri = path_to_uri(&p).unwrap();
        assert_eq!(uri.as_str(), "file:///tmp/a%20b/%C3%BCn%C3%AF.route");
        assert_eq!(uri_to_path(&uri).unwrap(), p);
        let other: lsp::Uri = "untitled:Untitled-1".parse().unwrap();
        assert_eq!(uri_to_path(&other), None);
    }
}
