// Starts `routeplane lsp` for .route files. All the language smarts live in
// the server, so VS Code shows exactly what `routeplane check` says.
import * as vscode from "vscode";
import { LanguageClient, LanguageClientOptions, ServerOptions } from "vscode-languageclient/node";

let client: LanguageClient | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const command = vscode.workspace.getConfiguration("routeplane").get<string>("path", "routeplane");
  const serverOptions: ServerOptions = { command, args: ["lsp"] };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: "file", language: "routeplane" }],
    synchronize: { fileEvents: vscode.workspace.createFileSystemWatcher("**/*.route") },
  };
  client = new LanguageClient("routeplane", "routeplane", serverOptions, clientOptions);
  context.subscriptions.push({ dispose: () => void client?.stop() });
  try {
    await client.start();
  } catch (err) {
    void vscode.window.showErrorMessage(
      `routeplane: could not start \`${command} lsp\` (${String(err)}). Set "routeplane.path" to the binary.`,
    );
  }
}

export async function deactivate(): Promise<void> {
  await client?.stop();
}
