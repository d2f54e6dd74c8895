package oracle

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const module = "github.com/blktap-go/blktap"

// The import arrows of docs/ARCHITECTURE.md, section "Arrows": cmd -> reconciler -> {tapengine, formats,
// config, xenstore}; tapengine -> formats; formats, xenstore and config
// import nothing of the project (but their own sub-packages and the leaves
// internal/units, internal/rbdspec and internal/nbdwire, which import
// nothing at all), tapengine
// never imports xenstore, and the pure Plan reads no clock and does no I/O.
func TestLayering(t *testing.T) {
	root := filepath.Join("..", "..")
	rules := map[string][]string{ // top-level dir -> project packages it may import
		"formats":   {"formats/", "internal/units/", "internal/rbdspec/", "internal/nbdwire/"},
		"xenstore":  {"xenstore/"},
		"config":    {"config/", "internal/units/", "internal/rbdspec/"},
		"tapengine": {"tapengine/", "formats/", "internal/units/", "internal/nbdwire/"},
	}
	for dir, allowed := range rules {
		filepath.WalkDir(filepath.Join(root, dir), func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return err
			}
			f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
			if err != nil {
				t.Fatal(err)
			}
			for _, imp := range f.Imports {
				p := strings.Trim(imp.Path.Value, `"`)
				rest, ours := strings.CutPrefix(p, module+"/")
				if !ours || rest == "internal/oracle" {
					continue
				}
				ok := false
				for _, a := range allowed {
					if strings.HasPrefix(rest+"/", a) {
						ok = true
					}
				}
				if !ok {
					t.Errorf("%s imports %s: %s may not depend on it", path, p, dir)
				}
			}
			return nil
		})
	}
	f, err := parser.ParseFile(token.NewFileSet(), filepath.Join(root, "reconciler", "plan.go"), nil, parser.ImportsOnly)
	if err != nil {
		t.Fatal(err)
	}
	for _, imp := range f.Imports {
		t.Errorf("reconciler/plan.go imports %s: Plan must stay pure (no clock, no I/O)", imp.Path.Value)
	}
}
