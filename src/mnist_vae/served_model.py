"""The file MLflow logs as the served model's code ("models from code"): loading the model runs
this file, which builds the pyfunc from the package the model carries, instead of unpickling a
python_model.pkl, a file that would run whatever code it names. Its weights come from the
checkpoint artifact, which loads with weights_only=True. See served.py."""

import mlflow

from mnist_vae.served import VaeModel

mlflow.models.set_model(VaeModel())
