-- Headless Neovim end-to-end check: start `routeplane lsp` for the current
-- buffer, wait for its diagnostics, write them to $ROUTEPLANE_OUT, quit.
-- Written for Neovim 0.7+ (vim.lsp.start_client exists in every version since).
local bin = assert(os.getenv("ROUTEPLANE_BIN"), "ROUTEPLANE_BIN is not set")
local out = assert(os.getenv("ROUTEPLANE_OUT"), "ROUTEPLANE_OUT is not set")

local client = vim.lsp.start_client({
  name = "routeplane",
  cmd = { bin, "lsp" },
  root_dir = vim.fn.expand("%:p:h"),
})
vim.lsp.buf_attach_client(0, client)

local got = vim.wait(15000, function()
  return #vim.diagnostic.get(0) > 0
end, 50)

local lines = {}
if not got then
  table.insert(lines, "TIMEOUT: no diagnostics")
end
for _, d in ipairs(vim.diagnostic.get(0)) do
  local code = d.code
  if code == nil and d.user_data and d.user_data.lsp then
    code = d.user_data.lsp.code
  end
  local message = d.message:gsub("\n", " | ")
  table.insert(lines, string.format("%d:%d:%d:%s:%s", d.lnum + 1, d.col + 1, d.severity, tostring(code), message))
end
vim.fn.writefile(lines, out)
vim.lsp.stop_client(client)
vim.cmd("qa!")
